"""Which features should the linear probe read? Compares read-outs of the full quality benchmark's
pretrained encoders on the validation splits (the test split is never read).

Each read-out is a concatenation of mean-pooled patch tokens from some of these places: ``stem``
(the tokenizer's output), ``block<i>`` (block i's residual stream, layer-normalised without
affine), ``final`` (the body's output through its own final norm: ``Medformer.embed``), ``latents``
(the latent tokens of the final output) and ``final_max`` (the final tokens max-pooled). Every
read-out gets the product's probe (standardised features, L2 logistic regression, C chosen on val).

    python -m benchmarks.probe_readout --data-dir ../shared/data/medmnist

reads the cached pretrainings of ``python -m benchmarks.quality`` (``results/cache``; a method and
seed with none cached is skipped, never trained here) and writes ``results/readout-val/rows.jsonl``
(one row per method, dataset and seed; resumable) and ``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import DATASETS, RESULTS, write_atomic
from benchmarks.quality.experiment import PRESETS, Experiment, append_row, read_rows
from medformer.data import MedMNISTSplit, get_info, resolve_data_dir
from medformer.eval.metrics import labelled_subsets, official_metrics, selection_key
from medformer.eval.probe import DEFAULT_CS, _fit_logreg
from medformer.model import Medformer

log = logging.getLogger("benchmarks.probe_readout")

METHODS = ("random_init", "local_only", "federated", "centralized", "dp_federated")
#: Read-out -> the pooled parts it concatenates: ``block*`` = every block but the last (``block<i>``,
#: i < depth - 1), ``penultimate`` = the block before the last; ``final`` is the last block.
READOUTS: dict[str, tuple[str, ...]] = {
    "final": ("final",),
    "final+latents": ("final", "latents"),
    "final+stem": ("final", "stem"),
    "final+max": ("final", "final_max"),
    "last two blocks": ("penultimate", "final"),
    "every block": ("block*", "final"),
    "stem+every block": ("stem", "block*", "final"),
}


@torch.no_grad()
def pooled_parts(model: Medformer, split: MedMNISTSplit, dataset: str, batch: int = 256) -> dict[str, np.ndarray]:
    """Every candidate part of a read-out, for a whole split: name -> float32 (N, dim)."""
    model.eval()
    t = model.cfg.num_latents
    chunks: dict[str, list[np.ndarray]] = defaultdict(list)
    for start in range(0, len(split), batch):
        x, _ = split.batch(slice(start, start + batch))
        stem = model.patch_tokens(x, dataset)
        hidden: list[torch.Tensor] = []
        final = model.body(model.latents[dataset](stem), dataset, hidden=hidden)
        parts = {"stem": stem.mean(1), "final": model.pool(final), "latents": final[:, :t].mean(1),
                 "final_max": final[:, t:].amax(1)}
        for i, h in enumerate(hidden[:-1]):
            parts[f"block{i}"] = model.pool(torch.nn.functional.layer_norm(h, h.shape[-1:]))
        for k, v in parts.items():
            chunks[k].append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _columns(readout: tuple[str, ...], parts: dict[str, np.ndarray]) -> np.ndarray:
    blocks = sorted((k for k in parts if k.startswith("block")), key=lambda k: int(k[5:]))
    names: list[str] = []
    for p in readout:
        names += blocks if p == "block*" else (blocks[-1:] if p == "penultimate" else [p])
    return np.concatenate([parts[n] for n in names], axis=1)


def probe_val_auc(train: np.ndarray, val: np.ndarray, y_train: np.ndarray, y_val: np.ndarray, dataset: str) -> float:
    """The product's probe (``medformer.eval.linear_probe``) on given features: val AUC of the best C."""
    info = get_info(dataset)
    mean, std = train.mean(0, dtype=np.float64), train.std(0, dtype=np.float64) + 1e-6
    best: dict[str, float] | None = None
    with threadpool_limits(limits=1, user_api="blas"):
        for c in DEFAULT_CS:
            predict = _fit_logreg((train - mean) / std, y_train, info.task, info.n_classes, c)
            val_metrics = official_metrics(y_val, predict((val - mean) / std), info.task)
            if best is None or selection_key(val_metrics) > selection_key(best):
                best = val_metrics
    return float(best["auc"])


def summarize(rows: list[dict[str, Any]]) -> str:
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        for readout, auc in r["val_auc"].items():
            cells[(readout, r["method"], r["dataset"])].append(auc)
    datasets = [d for d in DATASETS if any(k[2] == d for k in cells)]
    out = ["# Probe read-outs on validation (full benchmark's cached encoders)", "",
           "Val AUC, mean over the seeds present; `fed - RI` = federated minus random-init; "
           "`mean fed` = the federated probe's mean over datasets.", ""]
    head = " | ".join(d.replace("mnist", "") for d in datasets)
    out += [f"| read-out | method | {head} | mean |", "|---|---|" + "---|" * (len(datasets) + 1)]
    for readout in READOUTS:
        for method in METHODS:
            vals = [np.mean(cells[(readout, method, d)]) if cells[(readout, method, d)] else np.nan for d in datasets]
            if not np.all(np.isnan(vals)):
                out.append(f"| {readout} | {method} | " + " | ".join(f"{v:.3f}" for v in vals)
                           + f" | {np.nanmean(vals):.3f} |")
        diff = [np.mean(cells[(readout, "federated", d)]) - np.mean(cells[(readout, "random_init", d)])
                if cells[(readout, "federated", d)] and cells[(readout, "random_init", d)] else np.nan
                for d in datasets]
        out.append(f"| {readout} | fed - RI | " + " | ".join(f"{v:+.3f}" for v in diff)
                   + f" | {np.nanmean(diff):+.3f} |")
    seeds = sorted({r["seed"] for r in rows})
    out += ["", f"Seeds: {seeds}; rows: {len(rows)}. Command: `python -m benchmarks.probe_readout`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="MedMNIST folder (default: $MEDMNIST_DATA)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=RESULTS / "readout-val")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the quality benchmark's cache/ is")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    exp = Experiment("full", PRESETS["full"], list(DATASETS), str(resolve_data_dir(args.data_dir)), args.results,
                     split="val")
    path = args.out / "rows.jsonl"
    done = {(r["method"], r["dataset"], r["seed"]) for r in read_rows(path)
            if r["fingerprint"] == exp.pretrain_fingerprint}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in METHODS:
            cached = exp.pretrained_path(method, seed)
            if method != "random_init" and not cached.exists():
                log.warning("%s seed %d: no cached pretraining at %s; skipped", method, seed, cached)
                continue
            for dataset in DATASETS:
                if (method, dataset, seed) in done:
                    continue
                info = get_info(dataset)
                train, val = labelled_subsets(exp.splits(dataset), info.task, fraction=1.0, seed=seed)
                model = (exp.random_model(dataset, seed) if method == "random_init"
                         else exp.encoder(exp.pretrained(method, seed).states[dataset], dataset))
                tr, va = pooled_parts(model, train, dataset), pooled_parts(model, val, dataset)
                aucs = {name: round(probe_val_auc(_columns(ro, tr), _columns(ro, va), train.labels, val.labels,
                                                  dataset), 4) for name, ro in READOUTS.items()}
                append_row(path, {"fingerprint": exp.pretrain_fingerprint, "method": method, "dataset": dataset,
                                  "seed": seed, "val_auc": aucs})
                log.info("%s %s seed %d: %s", method, dataset, seed, aucs)
    rows = [r for r in read_rows(path) if r["fingerprint"] == exp.pretrain_fingerprint]
    write_atomic(args.out / "summary.md", summarize(rows))
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
