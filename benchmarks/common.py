"""Helpers shared by the benchmark scripts: machine facts, result files, statistics, reference numbers.

Every benchmark writes ``benchmarks/results/<name>.json`` (machine-readable, what
``benchmarks.report`` reads) and ``<name>.md`` (for people), both stating the machine, the command,
the seeds and the wall time. Files are replaced atomically, so an interrupted run never leaves a
half-written result behind.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medformer.files import write_text_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

#: MedMNIST v2 official test AUC / ACC (Yang et al., Scientific Data 2023), as listed in
#: ../shared/docs/ANCHORS.md: ResNet-18 (28) for the 2D subsets, ResNet-18+3D for the 3D ones.
#: These are published reference numbers, not results of ours.
ANCHORS: dict[str, dict[str, Any]] = {
    "breastmnist": {"model": "ResNet-18 (28)", "auc": 0.901, "acc": 0.863},
    "pneumoniamnist": {"model": "ResNet-18 (28)", "auc": 0.944, "acc": 0.854},
    "retinamnist": {"model": "ResNet-18 (28)", "auc": 0.717, "acc": 0.524},
    "adrenalmnist3d": {"model": "ResNet-18+3D", "auc": 0.827, "acc": 0.721},
    "vesselmnist3d": {"model": "ResNet-18+3D", "auc": 0.874, "acc": 0.877},
}
ANCHOR_SOURCE = "MedMNIST v2 (Yang et al., Sci. Data 2023), via ../shared/docs/ANCHORS.md"

DATASETS: tuple[str, ...] = tuple(ANCHORS)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    except OSError:
        pass
    return []


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (how busy the shared CPU was)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", None)
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def _git() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, load, library versions and git state of this run."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": _mem_total_gib(),
        "load_average_at_start": load_average(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("torch", "flwr", "opacus", "medmnist", "numpy", "sklearn")},
        "git": _git(),
    }


def command_line() -> str:
    """How this process was started, as a shell command a reader can rerun."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py") and "benchmarks" in argv[0]:
        path = Path(argv[0])  # benchmarks/<name>.py, or benchmarks/<name>/__main__.py for a package
        argv[0] = "-m benchmarks." + (path.parent.name if path.name == "__main__.py" else path.stem)
    return "python " + " ".join(shlex.quote(a) if not a.startswith("-m benchmarks.") else a for a in argv)


# --------------------------------------------------------------------------- files


write_atomic = write_text_atomic  # the project's one atomic text writer


def write_result(out_dir: Path, name: str, payload: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md`` atomically; return both paths."""
    js, md = Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"
    write_atomic(js, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    write_atomic(md, markdown.rstrip() + "\n")
    return js, md


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def header_lines(payload: Mapping[str, Any]) -> list[str]:
    """The Markdown preamble every result file starts with: machine, command, seeds, wall time."""
    m = payload["machine"]
    v = m["versions"]
    lines = [
        f"- machine: {m['cores_usable']} of {m['cores']} cores usable, {m['cpu_model']} "
        f"({', '.join(m['cpu_flags']) or 'no SIMD flags read'}), {m['memory_gib']} GiB; "
        f"load average at start {m['load_average_at_start']}",
        f"- software: Python {m['python']}, torch {v['torch']}, flwr {v['flwr']}, opacus {v['opacus']}, "
        f"medmnist {v['medmnist']}, numpy {v['numpy']}, scikit-learn {v['sklearn']}; "
        f"git {(m['git']['commit'] or 'unknown')[:10]}{' (uncommitted changes)' if m['git']['dirty'] else ''}",
        f"- command: `{payload['command']}`",
    ]
    if "seeds" in payload:
        lines.append(f"- seeds: {', '.join(map(str, payload['seeds']))}")
    lines.append(f"- wall time: {fmt_seconds(payload['wall_seconds'])}")
    lines.append(f"- finished: {payload.get('finished_at', '?')}")
    return lines


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


# --------------------------------------------------------------------------- numbers


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; None for one value) of the finite values."""
    xs = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": mean, "std": std, "n": len(xs)}


def fmt_ms(stat: Mapping[str, Any] | None, digits: int = 3, *, signed: bool = False) -> str:
    """``0.912 ± 0.010`` (``0.912`` for one value, ``—`` for none; ``+0.012`` when ``signed``)."""
    if not stat or stat.get("mean") is None:
        return "—"
    s = f"{stat['mean']:{'+' if signed else ''}.{digits}f}"
    return s + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- compute


def matmul_peak_gflops(*, n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict[str, Any]:
    """This CPU's fp32 matmul rate: best of ``repeats`` n x n x n products (2 n^3 FLOPs each)."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up (allocations, BLAS init)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        return {"gflops": 2 * n**3 / best / 1e9, "n": n, "repeats": repeats, "threads": torch.get_num_threads(),
                "best_seconds": best}
    finally:
        torch.set_num_threads(old)
