"""``medfl predict MODEL_DIR --dataset FLAG --split test|val|train --out preds.csv`` (or ``--images
FILE.npz``): one row per image, its index then its class scores, in the CSV format ``medmnist.Evaluator``
saves and ``Evaluator.parse_and_evaluate`` reads, so anyone can compute the official metrics from it.

With ``--split`` the official AUC and ACC on that split's labels are printed too.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from medformer.data import DataError, get_info, load_split, register_data_dir
from medformer.device import resolve_device
from medformer.eval import official_metrics
from medformer.files import write_text_atomic
from medformer.predict import head_kind, images_split, score_split, scores_csv
from medformer.pretrained import load_pretrained, read_config


def run_predict(model_dir: str, *, dataset: str, out: str, split: str | None = None, images: str | None = None,
                size: int | None = None, data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Score and write ``out``; returns what was done (and the metrics when labels were at hand)."""
    if (split is None) == (images is None):
        raise DataError("give exactly one of --split (a split of --dataset in --data-dir) or --images FILE.npz")
    out_path = Path(out)
    if out_path.is_dir():
        raise DataError(f"--out {out_path} is a folder; give a file name such as preds.csv")
    register_data_dir(data_dir)
    config = read_config(model_dir)
    info = get_info(dataset)
    sizes = [d["size"] for d in config["datasets"] if d["flag"] == dataset]
    if not sizes:
        raise DataError(f"{model_dir} has no {dataset}: fine-tune it there first (medfl finetune {model_dir} "
                        f"--dataset {dataset})")
    size = sizes[0] if size is None else size
    if size not in sizes:
        raise DataError(f"--size {size}: {model_dir} has {dataset} at size {', '.join(map(str, sizes))}")
    dev = resolve_device(device)
    data = (load_split(dataset, split, size=size, data_dir=data_dir) if split is not None
            else images_split(images, dataset, size))
    model = load_pretrained(model_dir, device=dev)
    if head_kind(model, dataset) is None:
        raise DataError(f"{model_dir} has no head for {dataset}: fine-tune it first (medfl finetune {model_dir} "
                        f"--dataset {dataset})")
    scores = score_split(model, data, dataset)
    write_text_atomic(out_path, scores_csv(scores))
    done = {"dataset": dataset, "size": size, "images": len(data), "columns": int(scores.shape[1]), "out": str(out_path),
            "head": head_kind(model, dataset), "device": str(dev)}
    if split is not None:
        done.update(official_metrics(data.labels, scores, info.task), split=split)
    print(f"medfl predict: {len(data)} {dataset} image(s) scored ({done['head']} head, {dev}) -> {out_path}",
          file=sys.stderr)
    return done
