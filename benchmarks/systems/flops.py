"""The ``flops`` part: a model preset's pretext step in 2D and 3D, images/s and FLOP/s against this
CPU's fp32 matmul peak, measured in the same interleaved trials."""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


log = logging.getLogger("benchmarks.systems")



def part_flops(data_dir: str, *, threads: Sequence[int], trials: int = 15, batch: int = 128,
               preset: str = "default") -> dict[str, Any]:
    """:func:`flops_at` for each thread count (1 thread is the number a busy shared CPU can reproduce)."""
    runs = {str(t): flops_at(data_dir, threads=t, trials=trials, batch=batch, preset=preset) for t in threads}
    first = next(iter(runs.values()))
    return {k: first[k] for k in ("model", "pretext", "batch", "trials", "flop_counting")} | {"by_threads": runs}


def flops_at(data_dir: str, *, threads: int, trials: int = 15, batch: int = 128,
             preset: str = "default") -> dict[str, Any]:
    """Images/s and FLOP/s of a model preset's pretext training step, against the matmul peak.

    On a shared CPU single timings swing by an order of magnitude, so the matmul peak and the 2D and
    3D steps are timed in interleaved trials: the best of each is the least-disturbed estimate (both
    sides of the fraction see the same conditions), the median is what a run experiences.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from medformer.data import load_split
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as medformer.train.train_local
    cfg = make_config(preset)
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
    return {"model": preset, "pretext": {"mae": 1.0, "rotation": 0.5}, "batch": batch, "threads": threads,
            "trials": trials, "cases": cases,
            "matmul_peak": {"gflops": peak_best, "gflops_median": peak_median, "n": n,
                            "times": [round(t, 4) for t in peak_times],
                            "note": f"fp32 {n}^3 torch.matmul, timed in the same interleaved trials as the steps"},
            "flop_counting": "torch.utils.flop_counter.FlopCounterMode over one whole step (forward + backward): "
                             "matmul, conv and attention FLOPs; elementwise work, the optimizer and the masking's "
                             "sorting are not counted"}
