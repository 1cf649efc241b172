"""``medfl run`` as a measured subprocess: its own session, a wall clock, per-round metrics and the peak
memory (RSS and PSS) of the whole process tree, sampled from /proc."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from benchmarks.common import (REPO, load_average,
                               read_json)
from tools.processes import process_tree, stop_tree

log = logging.getLogger("benchmarks.systems")

CONFIGS = REPO / "simulations" / "configs"
#: Set for every Flower process: no `uv sync`, no update check, no telemetry.
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "1"}



def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB (0 when it is gone or unreadable)."""
    rss = pss = 0
    text = _read(f"/proc/{pid}/smaps_rollup")
    if text:
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
        return rss, pss
    status = _read(f"/proc/{pid}/status") or ""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = pss = int(line.split()[1])
    return rss, pss


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process tree every ``interval`` seconds; keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0
        self.timeline: list[tuple[float, int, int, int]] = []  # (t, processes, rss KiB, pss KiB)
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = process_tree(self.root)
            rss = pss = 0
            for pid in pids:
                r, p = _memory_kib(pid)
                rss += r
                pss += p
            self.samples += 1
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.timeline.append((round(time.monotonic() - self._t0, 1), len(pids), rss, pss))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def run_medfl(config: Path, sets: Sequence[str], data_dir: str, out_dir: Path, *, timeout: float,
              sample_memory: bool = False) -> dict[str, Any]:
    """``medfl run`` in its own session; returns exit code, wall time, per-round metrics and memory peaks."""
    cmd = [sys.executable, "-m", "simulations.cli", "run", str(config), "--data-dir", data_dir, "--out", str(out_dir),
           "--no-progress"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, **FLWR_ENV, "MEDMNIST_DATA": data_dir}
    log_path = out_dir.parent / f"{out_dir.name}.log"
    shown = "medfl run " + " ".join([str(config.relative_to(REPO)), "--data-dir", data_dir, "--out", "OUT",
                                     "--no-progress"] + [f"--set {s}" for s in sets])
    log.info("running: %s", shown)
    load_before = load_average()
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid) if sample_memory else None
        if sampler:
            sampler.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            wall = time.perf_counter() - t0
            if sampler:
                sampler.stop()
            leftovers = stop_tree(proc.pid, timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (out_dir / "metrics.jsonl").exists() else []
    summary = read_json(out_dir / "summary.json")
    result = {"command": shown, "exit_code": code, "timed_out": code is None, "wall_seconds": wall,
              "load_average_before": load_before, "load_average_after": load_average(),
              "rounds": [{"round": m["round"], "seconds": m["seconds"], "sampled": len(m.get("sampled", [])),
                          "trained": len(m.get("trained", {})), "dropped": m.get("dropped", {}),
                          "bytes_sent": m.get("bytes_sent", {}), "bytes_received": m.get("bytes_received", {}),
                          "evaluated": "downstream" in m} for m in metrics],
              "summary_wall_seconds": summary.get("wall_seconds") if summary else None,
              "leftover_processes_killed": leftovers}
    if code != 0:
        tail = log_path.read_text().splitlines()[-15:] if log_path.exists() else []
        result["log_tail"] = tail
        log.warning("medfl run exited %s; log tail:\n%s", code, "\n".join(tail))
    if sampler:
        result["memory"] = {"peak_rss_bytes": sampler.peak_rss * 1024, "peak_pss_bytes": sampler.peak_pss * 1024,
                            "peak_processes": sampler.peak_processes, "samples": sampler.samples,
                            "interval_seconds": sampler.interval,
                            "timeline_every_10th": sampler.timeline[::10]}
    return result
