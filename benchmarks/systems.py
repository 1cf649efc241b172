"""Systems performance: compute efficiency, federation overhead, scale and communication.

    python -m benchmarks.systems --data-dir ../shared/data/medmnist                 # every part
    python -m benchmarks.systems --parts flops,comm --data-dir ../shared/data/medmnist

Parts (each rewrites only its own section of ``results/systems.json``):

  flops     the default model's pretext step (masked reconstruction + rotation, batch 128) in 2D and 3D:
            images/s and FLOP/s (matmul/conv FLOPs counted by torch.utils.flop_counter, forward +
            backward) as a fraction of this CPU's fp32 matmul peak, measured in the same run
  overhead  seconds per round of ``medfl run`` quickstart (Flower simulation, read from
            metrics.jsonl) against the same local training as bare PyTorch loops over the same data,
            seeds and aggregation: sequentially in one process and in 2 worker processes
  scale     ``medfl run`` non-iid PneumoniaMNIST split over 100 simulated hospitals, 10 sampled per
            round, 5 rounds: seconds per round and the peak memory (RSS and PSS) of the whole process
            tree, sampled from /proc every 0.5 s
  comm      bytes a hospital receives and sends per round with keyed aggregation against the whole
            model, five-hospitals scenario; checked against the bytes the overhead run logged

Timings on a shared machine move with the other work on it: every section records the load
average before and after it ran.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (REPO, RESULTS, command_line, fmt_bytes, fmt_seconds, header_lines, load_average,
                               machine_info, md_table, now, read_json, write_result)
from tools.processes import process_tree, stop_tree

log = logging.getLogger("benchmarks.systems")

PARTS = ("flops", "overhead", "scale", "comm")  # comm last: it checks against the overhead run
CONFIGS = REPO / "simulations" / "configs"
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "1"}
TARGET_OVERHEAD = 1.15
TARGET_SCALE_GIB = 8.0


# --------------------------------------------------------------------------- flops


def part_flops(data_dir: str, *, threads: Sequence[int], trials: int = 15, batch: int = 128) -> dict[str, Any]:
    """:func:`flops_at` for each thread count (1 thread is the number a busy shared CPU can reproduce)."""
    runs = {str(t): flops_at(data_dir, threads=t, trials=trials, batch=batch) for t in threads}
    first = next(iter(runs.values()))
    return {k: first[k] for k in ("model", "pretext", "batch", "trials", "flop_counting")} | {"by_threads": runs}


def flops_at(data_dir: str, *, threads: int, trials: int = 15, batch: int = 128) -> dict[str, Any]:
    """Images/s and FLOP/s of the default model's pretext training step, against the matmul peak.

    On a shared CPU single timings swing by an order of magnitude, so the matmul peak and the 2D and
    3D steps are timed in interleaved trials: the best of each is the least-disturbed estimate (both
    sides of the fraction see the same conditions), the median is what a run experiences.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from medformer.data import load_split
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as medformer.training.train_local
    cfg = make_config("default")
    objective = PretextObjective({"mae": 1.0, "rotation": 0.5}, mask_ratio=0.75)
    cases: dict[str, dict[str, Any]] = {}
    steps = {}
    for label, flag in (("2d", "pneumoniamnist"), ("3d", "vesselmnist3d")):
        train = load_split(flag, "train", data_dir=data_dir)
        model = build_pretext_model(cfg, [(flag, 28)], objective)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        gen = torch.Generator().manual_seed(0)
        x, _ = train.batch(np.arange(batch))

        def step(model=model, opt=opt, gen=gen, x=x, flag=flag) -> None:
            loss, _ = objective(model, x, flag, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with FlopCounterMode(display=False) as counter:
            step()
        step()  # warm-up
        steps[label] = step
        cases[label] = {"dataset": flag, "parameters": sum(p.numel() for p in model.parameters()),
                        "flops_per_step": counter.get_total_flops(), "times": []}
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    peak_times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        peak_times.append(time.perf_counter() - t0)
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            cases[label]["times"].append(time.perf_counter() - t0)
    peak_best = 2 * n**3 / min(peak_times) / 1e9
    peak_median = 2 * n**3 / statistics.median(peak_times) / 1e9
    for label, c in cases.items():
        best, median = min(c["times"]), statistics.median(c["times"])
        flops = c["flops_per_step"]
        c.update({"flops_per_image": flops / batch, "seconds_per_step_best": best, "seconds_per_step_median": median,
                  "images_per_second_best": batch / best, "images_per_second_median": batch / median,
                  "gflops_best": flops / best / 1e9, "gflops_median": flops / median / 1e9,
                  "fraction_of_peak_best": flops / best / 1e9 / peak_best,
                  "fraction_of_peak_median": flops / median / 1e9 / peak_median,
                  "times": [round(t, 4) for t in c["times"]]})
        log.info("flops %s: best %.0f img/s, %.1f GFLOP/s = %.0f%% of peak; median %.0f img/s (%.0f%%); "
                 "%.1f MFLOP/image", label, batch / best, flops / best / 1e9, 100 * c["fraction_of_peak_best"],
                 batch / median, 100 * c["fraction_of_peak_median"], flops / batch / 1e6)
    return {"model": "default", "pretext": {"mae": 1.0, "rotation": 0.5}, "batch": batch, "threads": threads,
            "trials": trials, "cases": cases,
            "matmul_peak": {"gflops": peak_best, "gflops_median": peak_median, "n": n,
                            "times": [round(t, 4) for t in peak_times],
                            "note": f"fp32 {n}^3 torch.matmul, timed in the same interleaved trials as the steps"},
            "flop_counting": "torch.utils.flop_counter.FlopCounterMode over one whole step (forward + backward): "
                             "matmul, conv and attention FLOPs; elementwise work, the optimizer and the masking's "
                             "sorting are not counted"}


# --------------------------------------------------------------------------- communication


def keyed_bytes(preset: str, datasets: Sequence[str], pretext: dict[str, float], mask_ratio: float
                ) -> dict[str, Any]:
    """Bytes of the keys each dataset's hospital holds (what it receives and sends) and of the global model."""
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model

    cfg = make_config(preset)
    objective = PretextObjective(pretext, mask_ratio=mask_ratio)

    def nbytes(model: torch.nn.Module) -> tuple[int, int]:
        sd = model.state_dict()
        return sum(v.numel() * v.element_size() for v in sd.values()), len(sd)

    with torch.device("meta"):
        whole, whole_keys = nbytes(build_pretext_model(cfg, [(d, 28) for d in datasets], objective))
        per = {d: nbytes(build_pretext_model(cfg, [(d, 28)], objective)) for d in datasets}
    return {"whole_model_bytes": whole, "whole_model_keys": whole_keys,
            "hospitals": {d: {"keyed_bytes": b, "keys": k, "fraction_of_whole": b / whole} for d, (b, k) in per.items()}}


def part_comm(overhead: dict[str, Any] | None) -> dict[str, Any]:
    from config import load_scenario

    sc = load_scenario(CONFIGS / "five-hospitals.yaml")
    names = {h.dataset: h.name for h in sc.hospitals}
    res = keyed_bytes(sc.model.preset, [d for d, _ in sc.datasets()], dict(sc.pretext), sc.mask_ratio)
    rows = {}
    for d, r in res["hospitals"].items():
        rows[names[d]] = {"dataset": d, "received_per_round": r["keyed_bytes"], "sent_per_round": r["keyed_bytes"],
                          "keys": r["keys"], "whole_model_bytes": res["whole_model_bytes"],
                          "fraction_of_whole": r["fraction_of_whole"]}
    total_keyed = sum(2 * r["received_per_round"] for r in rows.values())
    total_whole = 2 * res["whole_model_bytes"] * len(rows)
    out = {"scenario": "five-hospitals", "model": sc.model.preset, "dtype": "float32",
           "whole_model_bytes": res["whole_model_bytes"], "whole_model_keys": res["whole_model_keys"],
           "hospitals": rows, "round_total_keyed_bytes": total_keyed, "round_total_whole_bytes": total_whole,
           "round_saving": 1 - total_keyed / total_whole,
           "method": "computed from the keys a hospital's pretext model holds (the keys server.federation gives "
                     "each site and server.strategy sends); both directions carry the same keys"}
    # Cross-check: the bytes the overhead run's Flower strategy logged for the quickstart hospitals.
    if overhead and overhead.get("flower_bytes_sent"):
        qs = load_scenario(CONFIGS / "quickstart.yaml")
        computed = keyed_bytes(overhead["model"], [d for d, _ in qs.datasets()], dict(qs.pretext), qs.mask_ratio)
        qnames = {h.name: h.dataset for h in qs.hospitals}
        logged = overhead["flower_bytes_sent"]
        out["check_against_flower_run"] = {
            name: {"logged_bytes_sent": logged.get(name), "computed": computed["hospitals"][d]["keyed_bytes"],
                   "equal": logged.get(name) == computed["hospitals"][d]["keyed_bytes"]}
            for name, d in qnames.items()}
    return out


# --------------------------------------------------------------------------- process tree


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


# --------------------------------------------------------------------------- bare loops


_WORKER: dict[str, Any] = {}


def _worker_init(data_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["data_dir"] = data_dir


def _bare_train(task: tuple[str, dict[str, np.ndarray]]) -> tuple[str, dict[str, np.ndarray], int, float, float]:
    """One site's round as its ClientApp runs it (``client.round.train_round``), minus Flower."""
    from client.round import train_round
    from protocol import RoundInstructions

    text, arrays = task
    t0 = time.perf_counter()
    ins = RoundInstructions.from_json(text)
    site = dataclasses.replace(ins.site, data_dir=_WORKER["data_dir"])
    out = train_round(ins, site, {k: torch.from_numpy(v) for k, v in arrays.items()}, ledger_state=None,
                      optimizer_state=None)
    trained = {k: v.detach().numpy().copy() for k, v in out.trained.items()}
    return site.name, trained, out.result.num_examples, time.perf_counter() - t0, out.result.seconds


def bare_rounds(scenario, data_dir: str, *, rounds: int, workers: int, threads: int) -> dict[str, Any]:
    """The scenario's rounds as plain PyTorch: ``workers`` = 0 runs the hospitals sequentially in this
    process with ``threads`` torch threads; otherwise a pool of ``workers`` processes, ``threads`` each."""
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model
    from server.aggregation import Update
    from server.instructions import Instructor
    from server.strategy import make_aggregator

    sc = scenario
    cfg = make_config(sc.model.preset, **sc.model.overrides)
    objective = PretextObjective(sc.pretext, mask_ratio=sc.mask_ratio)
    torch.manual_seed(sc.seed)
    glob = {k: v.detach().numpy().copy()
            for k, v in build_pretext_model(cfg, sc.datasets(), objective).state_dict().items()}
    keys = {h.name: list(build_pretext_model(cfg, [(h.dataset, h.size)], objective).state_dict()) for h in sc.hospitals}
    instructor = Instructor(sc, data_dir=data_dir, privacy_states={})
    aggregator = make_aggregator(sc)  # the strategy's aggregation
    pool = None
    old_threads = torch.get_num_threads()
    load_before = load_average()
    if workers:
        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(data_dir, threads))
    else:
        _worker_init(data_dir, threads)
    per_round = []
    try:
        for rnd in range(1, rounds + 1):
            tasks = [(dataclasses.replace(instructor(site, rnd), threads=threads).to_json(),
                      {k: glob[k] for k in keys[site.name]}) for site in sc.clients()]
            t0 = time.perf_counter()
            replies = pool.map(_bare_train, tasks, chunksize=1) if pool else [_bare_train(x) for x in tasks]
            updates = [Update(n, a, k) for n, a, k, _, _ in replies]
            glob = aggregator.combine(glob, {n: {k: glob[k] for k in keys[n]} for n, _, _, _, _ in replies}, updates)
            per_round.append({"round": rnd, "seconds": time.perf_counter() - t0,
                              "hospital_seconds": {n: s for n, _, _, s, _ in replies},
                              "train_seconds": {n: ts for n, _, _, _, ts in replies}})
    finally:
        if pool:
            pool.close()
            pool.join()
        torch.set_num_threads(old_threads)
    return {"workers": workers or 1, "processes": workers or 1, "threads_per_process": threads,
            "rounds": per_round, "load_average_before": load_before, "load_average_after": load_average()}


def _steady(rounds: list[dict[str, Any]], *, drop_last: bool) -> list[float]:
    """Round seconds without round 1 (start-up) and, for Flower runs, the last (central evaluation)."""
    rs = [r for r in rounds if r["round"] > 1]
    if drop_last and len(rs) > 1:
        rs = rs[:-1]
    return [r["seconds"] for r in rs]


def critical_path(seconds: Sequence[float], slots: int) -> float:
    """Shortest time ``slots`` workers need for these jobs (best assignment; the compute floor of a round)."""
    best = math.inf

    def place(i: int, loads: list[float]) -> None:
        nonlocal best
        if max(loads) >= best:
            return
        if i == len(seconds):
            best = max(loads)
            return
        for j in range(len(loads)):
            loads[j] += seconds[i]
            place(i + 1, loads)
            loads[j] -= seconds[i]

    place(0, [0.0] * max(1, slots))
    return best if seconds else 0.0


def _per_round(rounds: list[dict[str, Any]], train_seconds, slots: int, keep: list[int]) -> dict[str, Any]:
    """Mean round seconds, mean compute floor (train_local only) and their ratio over the rounds ``keep``."""
    rs = [r for r in rounds if r["round"] in keep]
    secs = [r["seconds"] for r in rs]
    floors = [critical_path(list(train_seconds(r).values()), slots) for r in rs]
    return {"mean_round_seconds": statistics.mean(secs), "mean_compute_floor_seconds": statistics.mean(floors),
            "round_over_floor": statistics.mean(s / f for s, f in zip(secs, floors))}


def part_overhead(data_dir: str, work: Path, *, rounds: int, local_steps: int, preset: str, seq_threads: int,
                  repeats: int, timeout: float) -> dict[str, Any]:
    """Flower rounds against bare loops, alternated ``repeats`` times (a shared CPU's load drifts).

    Two ratios: ``raw`` = Flower round seconds / bare round seconds (what the issue asks; moved by any load
    change between the runs), and ``normalised`` = (Flower round / its train_local floor) / (bare round / its
    floor), where a round's floor is the shortest time its workers (2 processes; 1 for the sequential loop)
    need for the hospitals' measured train_local seconds *in that same round*: load swings cancel, what
    remains is the cost of everything around local training (messages, serialisation, scheduling, model
    building, aggregation).
    """
    from config import load_scenario

    sets = [f"model.preset={preset}", f"training.rounds={rounds}", f"training.local_steps={local_steps}",
            "evaluation.linear_probe=false"]
    scenario = load_scenario(CONFIGS / "quickstart.yaml", sets)
    sim = scenario.simulation
    # As simulations.cli: Ray gets max(cpus_per_client, cores) CPUs, each ClientApp cpus_per_client of them.
    workers = max(sim.cpus_per_client, os.cpu_count() or 1) // sim.cpus_per_client
    keep = [r for r in range(2, rounds)] or [rounds]  # not round 1 (start-up), not the last (evaluation)
    runs = []
    for rep in range(repeats):
        flower = run_medfl(CONFIGS / "quickstart.yaml", sets, data_dir, work / f"overhead-medfl-{rep}",
                           timeout=timeout)
        if flower["exit_code"] != 0:
            raise RuntimeError(f"medfl run failed (exit {flower['exit_code']}); see {work}")
        trained = {m["round"]: m for m in
                   (json.loads(x) for x in (work / f"overhead-medfl-{rep}" / "metrics.jsonl").read_text().splitlines())}
        for r in flower["rounds"]:
            r["train_seconds"] = {n: float(m["seconds"]) for n, m in trained[r["round"]]["trained"].items()}
        log.info("overhead %d: flower rounds %s", rep, [round(r["seconds"], 2) for r in flower["rounds"]])
        parallel = bare_rounds(scenario, data_dir, rounds=rounds, workers=workers, threads=sim.threads_per_client)
        log.info("overhead %d: bare parallel rounds %s", rep, [round(r["seconds"], 2) for r in parallel["rounds"]])
        sequential = bare_rounds(scenario, data_dir, rounds=rounds, workers=0, threads=seq_threads)
        log.info("overhead %d: bare sequential rounds %s", rep, [round(r["seconds"], 2) for r in sequential["rounds"]])
        ts = lambda r: r["train_seconds"]  # noqa: E731
        f = _per_round(flower["rounds"], ts, workers, keep)
        p = _per_round(parallel["rounds"], ts, workers, keep)
        q = _per_round(sequential["rounds"], ts, 1, keep)
        runs.append({"flower": {**flower, **f}, "bare_parallel": {**parallel, **p}, "bare_sequential": {**sequential, **q},
                     "raw_ratio_vs_bare_parallel": f["mean_round_seconds"] / p["mean_round_seconds"],
                     "raw_ratio_vs_bare_sequential": f["mean_round_seconds"] / q["mean_round_seconds"],
                     "normalised_ratio_vs_bare_parallel": f["round_over_floor"] / p["round_over_floor"],
                     "normalised_ratio_vs_bare_sequential": f["round_over_floor"] / q["round_over_floor"]})
    first = runs[0]["flower"]

    def avg(key: str) -> float:  # the median alternation: one run hit by a load spike does not move it
        return statistics.median(r[key] for r in runs)

    return {
        "scenario": "quickstart", "model": preset, "sets": sets, "rounds": rounds, "local_steps": local_steps,
        "images_per_round": local_steps * scenario.training.batch_size * len(scenario.hospitals),
        "rounds_compared": keep, "repeats": repeats, "workers": workers, "sequential_threads": seq_threads,
        "engine": f"Flower simulation (Ray), {sim.cpus_per_client} CPU and {sim.threads_per_client} torch thread "
                  f"per ClientApp, {workers} at a time; bare: the same hospitals, seeds, train_local and keyed_mean "
                  f"in a pool of {workers} processes x {sim.threads_per_client} thread, or sequentially in one "
                  f"process x {seq_threads} threads",
        "flower_bytes_sent": first["rounds"][0]["bytes_sent"] if first["rounds"] else {},
        "runs": runs,
        "flower_mean_round_seconds": statistics.median(r["flower"]["mean_round_seconds"] for r in runs),
        "bare_parallel_mean_round_seconds": statistics.median(r["bare_parallel"]["mean_round_seconds"] for r in runs),
        "bare_sequential_mean_round_seconds": statistics.median(r["bare_sequential"]["mean_round_seconds"] for r in runs),
        "raw_ratio_vs_bare_parallel": avg("raw_ratio_vs_bare_parallel"),
        "raw_ratio_vs_bare_sequential": avg("raw_ratio_vs_bare_sequential"),
        "normalised_ratio_vs_bare_parallel": avg("normalised_ratio_vs_bare_parallel"),
        "normalised_ratio_vs_bare_sequential": avg("normalised_ratio_vs_bare_sequential"),
        "note": part_overhead.__doc__.split("\n\n", 1)[1].strip().replace("\n    ", " ").replace("\n", " "),
    }


def part_scale(data_dir: str, work: Path, *, parts: int, fraction: float, rounds: int, timeout: float
               ) -> dict[str, Any]:
    sets = [f"hospitals.0.partition.parts={parts}", f"strategy.fraction_train={fraction}", f"training.rounds={rounds}"]
    run = run_medfl(CONFIGS / "non-iid.yaml", sets, data_dir, work / "scale-medfl", timeout=timeout,
                    sample_memory=True)
    secs = [r["seconds"] for r in run["rounds"]]
    training_rounds = [r["seconds"] for r in run["rounds"] if not r["evaluated"]]
    return {"scenario": "non-iid", "clients": parts, "fraction_train": fraction, "sampled_per_round": [
        r["sampled"] for r in run["rounds"]], "rounds_planned": rounds, "sets": sets, "run": run,
        "round_seconds": secs, "median_round_seconds": statistics.median(secs) if secs else None,
        "median_training_round_seconds": statistics.median(training_rounds) if training_rounds else None,
        "peak_rss_bytes": run.get("memory", {}).get("peak_rss_bytes"),
        "peak_pss_bytes": run.get("memory", {}).get("peak_pss_bytes"),
        "note": "memory: summed over the medfl process, its descendants and its session (Ray's raylet, GCS, "
                "workers), sampled every 0.5 s; RSS counts shared pages once per process (upper bound), PSS "
                "splits them (closer to real use). The last round includes the central linear probe."}


# --------------------------------------------------------------------------- report


def _provenance(part: dict[str, Any]) -> str:
    return (f"_Measured {part['measured_at']} by `{part['command']}` in {fmt_seconds(part['wall_seconds'])}; "
            f"load average {part['load_average_before']} → {part['load_average_after']}._")


def render_markdown(payload: dict[str, Any]) -> str:
    lines = ["# Systems performance", ""] + header_lines(payload) + [""]
    p = payload["parts"]
    if "flops" in p:
        f = p["flops"]
        lines += ["## Compute efficiency of the default model's pretext step", "", _provenance(f), "",
                  f"Masked reconstruction + rotation, batch {f['batch']}; per thread count, {f['trials']} interleaved "
                  "trials of (fp32 2048^3 torch.matmul, 2D step, 3D step): the matmul peak is measured in the same "
                  "run, under the same load.", ""]
        rows = []
        for t, r in f["by_threads"].items():
            for k, c in r["cases"].items():
                rows.append([t, k.upper(), c["dataset"], f"{c['parameters']:,}", f"{c['flops_per_image'] / 1e6:.1f}",
                             f"{c['images_per_second_best']:.0f} / {c['images_per_second_median']:.0f}",
                             f"{c['gflops_best']:.1f} / {c['gflops_median']:.1f}",
                             f"{r['matmul_peak']['gflops']:.1f} / {r['matmul_peak']['gflops_median']:.1f}",
                             f"**{c['fraction_of_peak_best']:.0%}** / {c['fraction_of_peak_median']:.0%}"])
        lines += [md_table(["threads", "input", "dataset", "parameters", "MFLOP / image (fwd+bwd)",
                            "images/s (best / median)", "GFLOP/s (best / median)", "matmul peak GFLOP/s (best / median)",
                            "of peak (best / median)"], rows), "",
                  f['flop_counting'] + ". Best = the least-disturbed trial (each side of the fraction its own best); "
                  "median = typical on this shared machine. With 2 threads on a busy CPU, one descheduled thread "
                  "stalls the other at every parallel region: the 1-thread numbers are the reproducible ones.", ""]
    if "overhead" in p:
        o = p["overhead"]
        lines += ["## Federation overhead", "", _provenance(o), "",
                  f"Quickstart (3 hospitals, model `{o['model']}`, {o['local_steps']} local steps x batch 128 each "
                  f"= {o['images_per_round']} images per round), {o['rounds']} rounds, rounds {o['rounds_compared']} "
                  f"compared, {o['repeats']} alternations. {o['engine']}.", ""]
        rows = []
        for i, r in enumerate(o["runs"]):
            for key, name in (("flower", "`medfl run` (Flower)"),
                              ("bare_parallel", f"bare, {o['workers']} processes"),
                              ("bare_sequential", f"bare, sequential ({o['sequential_threads']} threads)")):
                x = r[key]
                rows.append([i + 1, name, f"{x['mean_round_seconds']:.2f}", f"{x['mean_compute_floor_seconds']:.2f}",
                             f"{x['round_over_floor']:.2f}",
                             ", ".join(f"{y['seconds']:.1f}" for y in x["rounds"]),
                             f"{x['load_average_before']} → {x['load_average_after']}"])
        lines += [md_table(["run", "how", "s / round", "train_local floor (s)", "round / floor", "all rounds (s)",
                            "load average"], rows), ""]
        lines += [f"Summary over the {o['repeats']} alternations (median of each alternation's ratio):", ""]
        rows = [["vs bare, parallel (like for like)", f"**{o['normalised_ratio_vs_bare_parallel']:.2f}x**",
                 f"{o['raw_ratio_vs_bare_parallel']:.2f}x"],
                [f"vs bare, sequential ({o['sequential_threads']} threads)",
                 f"{o['normalised_ratio_vs_bare_sequential']:.2f}x", f"{o['raw_ratio_vs_bare_sequential']:.2f}x"]]
        lines += [md_table(["Flower round / bare round", "normalised", "raw"], rows), "",
                  f"Target ≤ {TARGET_OVERHEAD}x: normalised "
                  f"**{'met' if o['normalised_ratio_vs_bare_parallel'] <= TARGET_OVERHEAD else 'missed'}**, raw "
                  f"**{'met' if o['raw_ratio_vs_bare_parallel'] <= TARGET_OVERHEAD else 'missed'}**. {o['note']}", ""]
    if "scale" in p:
        s = p["scale"]
        r = s["run"]
        ok = r["exit_code"] == 0 and s["peak_pss_bytes"] is not None
        lines += ["## Scale: 100 simulated hospitals", "", _provenance(s), "",
                  f"`{r['command']}`: exit code {r['exit_code']}, {len(s['round_seconds'])} of {s['rounds_planned']} "
                  f"rounds, clients sampled per round {s['sampled_per_round']}, wall {fmt_seconds(r['wall_seconds'])}; "
                  f"load average {r['load_average_before']} → {r['load_average_after']}.", ""]
        rows = [["seconds per round", ", ".join(f"{x:.1f}" for x in s["round_seconds"]),
                 f"median {s['median_round_seconds']:.1f}" if s["median_round_seconds"] else "—"],
                ["peak memory, process tree (PSS)", fmt_bytes(s["peak_pss_bytes"]),
                 f"target ≤ {TARGET_SCALE_GIB:g} GB: "
                 + ("**met**" if ok and s["peak_pss_bytes"] <= TARGET_SCALE_GIB * 1e9 else "**missed**")],
                ["peak memory, process tree (RSS sum)", fmt_bytes(s["peak_rss_bytes"]),
                 f"{r.get('memory', {}).get('peak_processes', '?')} processes at most"]]
        lines += [md_table(["measure", "value", "note"], rows), "", s["note"], ""]
    if "comm" in p:
        c = p["comm"]
        lines += ["## Communication per hospital per round (five-hospitals, default model, float32)", "", _provenance(c), ""]
        rows = [[n, h["dataset"], h["keys"], fmt_bytes(h["received_per_round"]), fmt_bytes(h["sent_per_round"]),
                 fmt_bytes(h["whole_model_bytes"]), f"{h['fraction_of_whole']:.0%}"] for n, h in c["hospitals"].items()]
        lines += [md_table(["hospital", "dataset", "keys", "receives", "sends", "whole model (each way)",
                            "keyed / whole"], rows), "",
                  f"All five together per round: {fmt_bytes(c['round_total_keyed_bytes'])} keyed vs "
                  f"{fmt_bytes(c['round_total_whole_bytes'])} whole-model ({c['round_saving']:.0%} less). "
                  f"{c['method']}."]
        chk = c.get("check_against_flower_run")
        if chk:
            lines += ["", "Check against the bytes the Flower strategy logged in the overhead run (quickstart): "
                      + ", ".join(f"{n} {v['logged_bytes_sent']} logged = {v['computed']} computed: {v['equal']}"
                                  for n, v in chk.items()) + "."]
        lines += [""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.systems", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help="which parts to run (default: %(default)s)")
    p.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default: %(default)s)")
    p.add_argument("--flops-threads", default="1,2", help="thread counts of the flops part (default: %(default)s)")
    p.add_argument("--overhead-rounds", type=int, default=4, help="rounds of the overhead runs (default: %(default)s)")
    p.add_argument("--overhead-steps", type=int, default=8,
                   help="local steps per hospital per round in the overhead runs (default: %(default)s)")
    p.add_argument("--overhead-model", default="default", help="model preset of the overhead runs (default: %(default)s)")
    p.add_argument("--overhead-repeats", type=int, default=3,
                   help="alternations of Flower / bare parallel / bare sequential (default: %(default)s)")
    p.add_argument("--overhead-seq-threads", type=int, default=2,
                   help="torch threads of the sequential bare loop (default: %(default)s)")
    p.add_argument("--scale-clients", type=int, default=100, help="simulated hospitals (default: %(default)s)")
    p.add_argument("--scale-fraction", type=float, default=0.1, help="fraction sampled per round (default: %(default)s)")
    p.add_argument("--scale-rounds", type=int, default=5, help="rounds (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per medfl run (default: %(default)s)")
    p.add_argument("--keep-runs", action="store_true", help="keep the medfl output folders (in a temp dir)")
    p.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
                        force=True)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        print(f"systems: error: unknown --parts {', '.join(bad)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    from medformer.data import DataError, resolve_data_dir
    try:
        data_dir = str(resolve_data_dir(args.data_dir))
        from medformer.data import dataset_path
        for flag in ("breastmnist", "pneumoniamnist", "retinamnist", "vesselmnist3d"):
            dataset_path(flag, 28, data_dir)
    except DataError as e:
        print(f"systems: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    t_start = time.perf_counter()
    previous = read_json(out / "systems.json") or {}
    results: dict[str, Any] = dict(previous.get("parts", {}))
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="medfl-systems-"))
    torch.set_num_threads(args.threads)
    try:
        for part in [x for x in PARTS if x in parts]:  # overhead before comm (comm checks against it)
            t0 = time.perf_counter()
            before = load_average()
            log.info("part %s ...", part)
            if part == "flops":
                res = part_flops(data_dir, threads=[int(t) for t in args.flops_threads.split(",")])
            elif part == "overhead":
                res = part_overhead(data_dir, work, rounds=args.overhead_rounds, local_steps=args.overhead_steps,
                                    preset=args.overhead_model, seq_threads=args.overhead_seq_threads,
                                    repeats=args.overhead_repeats, timeout=args.timeout)
            elif part == "scale":
                res = part_scale(data_dir, work, parts=args.scale_clients, fraction=args.scale_fraction,
                                 rounds=args.scale_rounds, timeout=args.timeout)
            else:
                res = part_comm(results.get("overhead"))
            res.update({"load_average_before": before, "load_average_after": load_average(),
                        "wall_seconds": time.perf_counter() - t0, "measured_at": now(), "command": command_line(),
                        "machine": machine})
            results[part] = res
            log.info("part %s done in %s", part, fmt_seconds(res["wall_seconds"]))
            _write(out, results, machine, t_start)
    finally:
        if not args.keep_runs:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.info("medfl runs kept in %s", work)
    if not args.no_report and out.resolve() == RESULTS.resolve():
        from benchmarks import report
        with contextlib.suppress(Exception):
            report.main([])
    return 0


def _write(out: Path, results: dict[str, Any], machine: dict[str, Any], t_start: float) -> None:
    ordered = {k: results[k] for k in PARTS if k in results}
    commands = list(dict.fromkeys(r["command"] for r in ordered.values()))
    payload = {"benchmark": "systems", "machine": machine, "command": "`; `".join(commands),
               "wall_seconds": sum(r["wall_seconds"] for r in ordered.values()),
               "this_invocation_seconds": time.perf_counter() - t_start, "finished_at": now(),
               "seeds": [0], "seed_note": "the scenarios' seed 0 (medfl runs and bare loops); generator seed 0 (flops)",
               "parts": ordered,
               "targets": _targets(ordered)}
    write_result(out, "systems", payload, render_markdown(payload))


def _targets(p: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if "overhead" in p:
        for kind in ("normalised", "raw"):
            r = p["overhead"][f"{kind}_ratio_vs_bare_parallel"]
            out.append({"target": f"federation overhead <= {TARGET_OVERHEAD}x bare local training ({kind})",
                        "value": r, "margin": TARGET_OVERHEAD - r, "status": "met" if r <= TARGET_OVERHEAD else "missed"})
    if "scale" in p and p["scale"].get("peak_pss_bytes") is not None:
        gb = p["scale"]["peak_pss_bytes"] / 1e9
        ok = p["scale"]["run"]["exit_code"] == 0
        out.append({"target": f"100 simulated hospitals within {TARGET_SCALE_GIB:g} GB", "value": gb,
                    "margin": TARGET_SCALE_GIB - gb, "status": "met" if ok and gb <= TARGET_SCALE_GIB else "missed"})
    return out


if __name__ == "__main__":
    sys.exit(main())
