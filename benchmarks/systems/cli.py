"""Systems performance: compute efficiency, federation overhead, scale and communication.

    python -m benchmarks.systems --data-dir ../shared/data/medmnist                 # every part
    python -m benchmarks.systems --parts flops,comm --data-dir ../shared/data/medmnist

Parts (each rewrites only its own section of ``results/systems.json``):

  flops     a model preset's pretext step (``--flops-model``; masked reconstruction + rotation, batch
            128) in 2D and 3D: images/s and FLOP/s (matmul/conv FLOPs counted by
            torch.utils.flop_counter, forward + backward) as a fraction of this CPU's fp32 matmul
            peak, measured in the same run
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
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (RESULTS, command_line, fmt_seconds, load_average,
                               machine_info, now, read_json)

log = logging.getLogger("benchmarks.systems")


from benchmarks.systems.comm import part_comm
from benchmarks.systems.flops import part_flops
from benchmarks.systems.overhead import part_overhead
from benchmarks.systems.report import PARTS, write_results
from benchmarks.systems.scale import part_scale
from medformer.model import preset_names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.systems", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help="which parts to run (default: %(default)s)")
    p.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default: %(default)s)")
    p.add_argument("--flops-model", default="default", choices=preset_names(), metavar="PRESET",
                   help="model preset of the flops part (default: %(default)s)")
    p.add_argument("--flops-threads", default="1,2", help="thread counts of the flops part (default: %(default)s)")
    p.add_argument("--overhead-rounds", type=int, default=4, help="rounds of the overhead runs (default: %(default)s)")
    p.add_argument("--overhead-steps", type=int, default=8,
                   help="local steps per hospital per round in the overhead runs (default: %(default)s)")
    p.add_argument("--overhead-model", default="default", choices=preset_names(), metavar="PRESET",
                   help="model preset of the overhead runs (default: %(default)s)")
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
                res = part_flops(data_dir, threads=[int(t) for t in args.flops_threads.split(",")],
                                 preset=args.flops_model)
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
            write_results(out, results, machine, t_start)
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
