"""The work a quality run takes (images, FLOPs) and the wall time it implies, before running it."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.quality.experiment import PRETRAINED, Experiment
from medformer.baselines import small_cnn
from medformer.data import get_info
from medformer.eval import label_subset, validation_epochs
from medformer.model import build_medformer
from medformer.pretext import build_pretext_model


def _flops_per_image(exp: "Experiment", dataset: str) -> dict[str, float]:
    """FLOPs per image (torch.utils.flop_counter) of a pretext step, a fine-tune step and a forward, and of
    the small CNN's fine-tune step and forward.

    Forwards are counted through the encoder (``embed``; the task head's two query tokens add little,
    and the counter's module tracker trips over them), a fine-tune step as 3 forwards (forward + backward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x, _ = exp.splits(dataset)["train"].batch(np.arange(8))
    out = {}
    with torch.random.fork_rng(devices=[]):
        pre = build_pretext_model(exp.cfg, [(dataset, 28)], exp.objective)
        with FlopCounterMode(display=False) as c:
            exp.objective(pre, x, dataset, torch.Generator().manual_seed(0))[0].backward()
        out["pretext"] = c.get_total_flops() / 8
        net = build_medformer(exp.cfg, [(dataset, 28)], downstream_heads=False)
        with FlopCounterMode(display=False) as c, torch.no_grad():
            net.embed(x, dataset)
        out["forward"] = c.get_total_flops() / 8
        out["fine_tune"] = 3 * out["forward"]
        cnn = small_cnn(dataset)
        with FlopCounterMode(display=False) as c, torch.no_grad():
            cnn.embed(x, dataset)
        out["cnn_forward"] = c.get_total_flops() / 8
        out["cnn_fine_tune"] = 3 * out["cnn_forward"]
    return out


def plan(exp: "Experiment", seeds: Sequence[int], methods: Sequence[str], systems_json: Path) -> dict[str, Any]:
    """The work the requested rows take (images, FLOPs) and the wall time it implies at the FLOP rates the
    pretext step reached in ``systems.json`` (best trial = idle machine; median = as measured, shared)."""
    p = exp.preset
    flops = {d: _flops_per_image(exp, d) for d in exp.datasets}
    work = {"2d": 0.0, "3d": 0.0}
    images: dict[str, float] = {}

    def add(part: str, d: str, kind: str, n: float) -> None:
        images[part] = images.get(part, 0) + n
        work["3d" if get_info(d).is_3d else "2d"] += n * flops[d][kind] * len(seeds)

    for d in exp.datasets:
        sp = exp.scored_splits(d)  # what the probes and fine-tunes learn from and are scored on
        n_tr = len(label_subset(sp["train"].labels, sp["train"].info.task, max_examples=p.max_train_examples))
        n_eval, n_test = len(sp["val"]), len(sp["test"])
        pre_images = exp.scenario.training.rounds * exp.steps_per_round(d) * exp.spec.batch_size
        for m in PRETRAINED:
            if m in methods or (m == "federated" and "label_efficiency" in methods):
                add(f"pretraining ({m})", d, "pretext", pre_images)
        probes = sum(m in methods for m in ("random_init", *PRETRAINED))
        add("linear probes (features)", d, "forward", probes * (n_tr + n_eval + n_test))
        ft = ("federated" in methods and p.federated_fine_tune) + ("supervised_scratch" in methods)
        ep = p.fine_tune_epochs_for(n_tr)
        add("fine-tunes, all labels", d, "fine_tune", ft * ep * n_tr)
        add("fine-tunes, all labels", d, "forward", ft * (len(validation_epochs(ep, p.validations)) * n_eval + n_test))
        if "cnn_scratch" in methods:  # its 3x3(x3) convolutions at full resolution cost more than the Medformer
            add("small CNN fine-tunes", d, "cnn_fine_tune", ep * n_tr)
            add("small CNN fine-tunes", d, "cnn_forward", len(validation_epochs(ep, p.validations)) * n_eval + n_test)
        if "label_efficiency" in methods:
            for f in p.label_fractions:
                n = len(label_subset(sp["train"].labels, sp["train"].info.task, fraction=f,
                                     max_examples=p.max_train_examples))
                epochs = p.fine_tune_epochs_for(n)
                add("label efficiency", d, "fine_tune", 2 * epochs * n)
                add("label efficiency", d, "forward",
                    2 * (len(validation_epochs(epochs, p.validations)) * n_eval + n_test))
    out: dict[str, Any] = {"seeds": list(seeds), "methods": list(methods), "rows": len(seeds) * len(methods) *
                           len(exp.datasets), "images_per_seed": images,
                           "tflop": {k: v / 1e12 for k, v in work.items()}, "flops_per_image": flops}
    sy = json.loads(systems_json.read_text()) if systems_json.exists() else None
    by_threads = (sy or {}).get("parts", {}).get("flops", {}).get("by_threads", {})
    out["estimated_seconds_by_threads"] = {
        t: {which: sum(work[k] / (r["cases"][k][f"gflops_{which}"] * 1e9) for k in work) for which in ("best", "median")}
        for t, r in by_threads.items()}
    runs = by_threads.get(str(torch.get_num_threads())) or next(iter(by_threads.values()), {})
    cases = runs.get("cases")
    if cases:
        out["estimate_threads"] = runs.get("threads")
        for which in ("best", "median"):
            rate = {k: cases[k][f"gflops_{which}"] * 1e9 for k in ("2d", "3d")}
            out[f"estimated_seconds_{which}"] = sum(work[k] / rate[k] for k in work)
        out["estimate_basis"] = (f"counted matmul/conv FLOPs of every step and forward, at the FLOP/s the default "
                                 f"model's pretext step reached in {systems_json.name} (2D / 3D separately); "
                                 "elementwise work and Python overhead are not counted")
    return out
