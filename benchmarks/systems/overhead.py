"""The ``overhead`` part: seconds per round of ``medfl run`` against the same rounds as bare PyTorch
loops (the product's own ``client.round.train_round`` and ``server.rounds.Aggregator``, without Flower)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (load_average)

log = logging.getLogger("benchmarks.systems")

from benchmarks.systems.runs import CONFIGS, run_medfl


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
