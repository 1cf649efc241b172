"""``medfl finetune MODEL_DIR --dataset FLAG``: fine-tune an exported encoder (or fit a linear probe on
it) at one site, on that site's own labelled splits, with the evaluation code the benchmark uses
(``medformer.eval``: selection on val, test scored once, official metrics).

Writes ``--out DIR``: the fine-tuned model in the export format (``model.safetensors``, ``config.json``,
``README.md``; ``medfl predict DIR`` scores with it), ``metrics.json`` and ``report.md``. A dataset the
encoder has never seen (another MedMNIST flag, another size, a site's imported dataset) gets fresh
tokenizer, latents and pretext-head parts where needed, and a fresh head: the command says so.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from medformer.data import DataError, get_info, load_splits, register_data_dir
from medformer.device import resolve_device
from medformer.eval import RECIPE, fine_tune, linear_probe
from medformer.eval.probe_head import LinearProbe
from medformer.pretrained import (attach_probe, load_pretrained, new_parts, probes_of, read_config, save_pretrained,
                                  with_datasets)
from simulations.model_card import finetune_card


def _say(message: str) -> None:
    print(f"medfl finetune: {message}", file=sys.stderr)


def dataset_size(config: dict, dataset: str, size: int | None) -> int:
    """``size`` if given, else the size the model already has for ``dataset``, else 28 (or the smallest)."""
    info = get_info(dataset)
    if size is None:
        own = [d["size"] for d in config["datasets"] if d["flag"] == dataset]
        size = own[0] if own else (28 if 28 in info.sizes else info.sizes[0])
    if size not in info.sizes:
        raise DataError(f"--size {size} is not available for {dataset}; choose from {', '.join(map(str, info.sizes))}")
    return size


def out_folder(out: str | None, dataset: str) -> Path:
    out_dir = Path(out) if out else Path("runs") / f"finetune-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"--out {out_dir} exists and is not an empty folder; choose another")
    return out_dir


def run_finetune(model_dir: str, *, dataset: str, size: int | None = None, data_dir: str | None = None,
                 label_fraction: float = 1.0, epochs: int | None = None, lr: float = RECIPE["lr"],
                 encoder_lr: float = RECIPE["encoder_lr"], batch_size: int = RECIPE["batch_size"],
                 warmup: float = RECIPE["warmup"], ema: float = RECIPE["ema"],
                 head_first: float = RECIPE["head_first"],
                 seed: int = 0, augment: str = "none", probe: bool = False, max_train_examples: int | None = None,
                 device: str = "auto", out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune (or probe) and write the out folder; returns metrics.json's content. ``epochs=None``:
    the recipe's (``medformer.eval.RECIPE``: at least its epochs and its optimizer steps)."""
    t0 = time.monotonic()
    if not 0.0 < label_fraction <= 1.0:
        raise DataError(f"--label-fraction {label_fraction} must be in (0, 1]")
    if (epochs is not None and epochs < 1) or batch_size < 1:
        raise DataError(f"--epochs {epochs} and --batch-size {batch_size} must be >= 1")
    if not 0.0 <= warmup < 1.0:
        raise DataError(f"--warmup {warmup} must be a share of the steps in [0, 1)")
    if not 0.0 <= head_first < 1.0:
        raise DataError(f"--head-first {head_first} must be a share of the steps in [0, 1)")
    if not 0.0 <= ema < 1.0:
        raise DataError(f"--ema {ema} must be a decay in [0, 1) (0: no weight average)")
    register_data_dir(data_dir)
    config = read_config(model_dir)
    size = dataset_size(config, dataset, size)
    out_dir = out_folder(out, dataset)
    splits = load_splits(dataset, size=size, data_dir=data_dir)
    dev = resolve_device(device)
    # --- inputs are valid ---
    model = load_pretrained(model_dir, device=dev)
    model, added = with_datasets(model, config, [(dataset, size)])
    parts = new_parts(added)
    if parts:
        _say(f"{dataset}@{size} is new to this encoder: fresh " + ", ".join(f"{k} ({v} tensors)" for k, v in parts.items()))
    info = get_info(dataset)
    fresh_head = not probe and dataset not in model.outputs
    if fresh_head:
        _say(f"a fresh head outputs.{dataset} ({info.num_outputs} outputs, {info.task})")
    method = "linear_probe" if probe else "fine_tune"
    kw = dict(label_fraction=label_fraction, max_train_examples=max_train_examples, seed=seed)
    # --epochs unset: the recipe's least epochs and steps (fine_tune sizes the epochs from its subset).
    min_epochs, min_steps = (RECIPE["min_epochs"], RECIPE["min_steps"]) if epochs is None else (epochs, 0)
    from tqdm import tqdm

    dropped: list[str] = []
    if probe:
        with tqdm(total=1, desc=f"linear probe {dataset}", disable=not progress, file=sys.stderr) as bar:
            result = linear_probe(model, splits, dataset, return_probe=True, **kw)
            bar.update(1)
        attach_probe(model, dataset, LinearProbe.from_probe(result.pop("probe")))
        final = model
    else:
        with tqdm(total=min_epochs, desc=f"fine-tune {dataset}", unit="epoch", disable=not progress,
                  file=sys.stderr) as bar:
            def step(stats: dict) -> None:
                bar.total = stats["epochs"]
                bar.update(stats["epoch"] - bar.n)
                bar.set_postfix(loss=f"{stats['train_loss']:.3f}", val_auc=f"{stats['val_auc']:.3f}")

            result = fine_tune(model, splits, dataset, epochs=min_epochs, min_steps=min_steps, lr=lr,
                               encoder_lr=encoder_lr, batch_size=batch_size, warmup=warmup, ema=ema,
                               head_first=head_first, augment=augment, progress=step, return_model=True, **kw)
        final = result.pop("model")
        # The encoder changed: heads and probes fitted to the old one would score wrongly; only this one stays.
        for flag in [f for f, _ in final.datasets if f != dataset and f in final.outputs]:
            del final.outputs[flag]
            dropped.append(f"outputs.{flag}")
        for flag in list(probes_of(final)):
            del final.probes[flag]
            dropped.append(f"probes.{flag}")
        if dropped:
            _say(f"dropped {', '.join(dropped)}: fitted to the encoder before this fine-tune")
    metrics = {
        "dataset": dataset, "size": size, "method": method, "auc": result["auc"], "acc": result["acc"],
        "val_auc": result["val_auc"], "val_acc": result["val_acc"],
        "test": {"auc": result["auc"], "acc": result["acc"]}, "val": {"auc": result["val_auc"], "acc": result["val_acc"]},
        **{k: v for k, v in result.items() if k not in ("auc", "acc", "val_auc", "val_acc", "seconds")},
        "label_fraction": label_fraction, "seed": seed, "device": str(dev), "augment": augment if not probe else None,
        "lr": lr if not probe else None, "encoder_lr": encoder_lr if not probe else None,
        "batch_size": batch_size if not probe else None, "warmup": warmup if not probe else None,
        "ema": ema if not probe else None, "head_first": head_first if not probe else None,
        "from_model": str(Path(model_dir).resolve()), "new_parts": parts, "fresh_head": fresh_head,
        "dropped_heads": dropped, "seconds": round(time.monotonic() - t0, 2),
    }
    source = {"kind": method, "scenario": config.get("source", {}).get("scenario"), "from_model": str(model_dir),
              "from_source": config.get("source", {}), "dataset": dataset, "size": size,
              "metrics": {k: metrics[k] for k in ("auc", "acc", "val_auc", "val_acc")}}

    def card(cfg: dict) -> str:
        return finetune_card(config=cfg, base=config, base_dir=str(model_dir), dataset=dataset, size=size,
                             metrics=metrics)

    save_pretrained(final, out_dir, preset=config["preset"], pretext=config.get("pretext"), card=card, source=source,
                    extra_files={"metrics.json": json.dumps(metrics, indent=2) + "\n", "report.md": report(metrics)})
    return metrics | {"out": str(out_dir)}


def report(m: dict[str, Any]) -> str:
    """report.md: the fine-tune's result for people."""
    settings = (f"C chosen on val: {m.get('C')}" if m["method"] == "linear_probe" else
                f"{m['epochs']} epoch(s), best epoch {m['best_epoch']} (chosen on val), lr {m['lr']:g} "
                f"(encoder {m['encoder_lr']:g}, warm-up {m['warmup']:g} of the steps), "
                + (f"head alone for the first {m['head_first']:g} of the steps, " if m.get("head_first") else "")
                + (f"weights averaged (EMA decay {m['ema']:g}), " if m.get("ema") else "")
                + f"batch {m['batch_size']}, augment {m['augment']}")
    lines = [f"# {m['method'].replace('_', ' ')}: {m['dataset']} ({m['size']} pixels)", "",
             "Official MedMNIST metrics (`medmnist.evaluator.getAUC` / `getACC`); the model was selected on val, "
             "test was scored once.", "",
             "| split | AUC | ACC |", "|---|---|---|",
             f"| val | {m['val_auc']:.4f} | {m['val_acc']:.4f} |", f"| test | {m['auc']:.4f} | {m['acc']:.4f} |", "",
             f"- labelled training images: {m['n_train']} (label fraction {m['label_fraction']:g}, seed {m['seed']})",
             f"- {settings}",
             f"- device: {m['device']}; {m['seconds']:.1f} s",
             f"- from: `{m['from_model']}`",
             f"- new to the encoder: {', '.join(f'{k} ({v} tensors)' for k, v in m['new_parts'].items()) or 'nothing'}"
             f"{'; a fresh head' if m['fresh_head'] else ''}",
             f"- heads dropped (fitted to the encoder before): {', '.join(m['dropped_heads']) or 'none'}", "",
             "Score images with `medfl predict` on this folder; `metrics.json` holds these numbers.", ""]
    return "\n".join(lines)
