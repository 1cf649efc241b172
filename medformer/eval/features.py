"""What a Medformer says about a whole split: its linear-probe features and downstream head scores,
in batches sized so a 3D split never needs more than 64 MiB of input at once."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from medformer.data import MedMNISTSplit
from medformer.eval.metrics import head_scores
from medformer.model import Medformer

_MAX_BATCH_ELEMENTS = 1 << 24

def _batch_size_for(split: MedMNISTSplit, batch_size: int) -> int:
    """``batch_size`` capped so one input batch stays under ``_MAX_BATCH_ELEMENTS`` floats."""
    per_sample = int(np.prod(split.images.shape[1:])) or 1
    return max(1, min(batch_size, _MAX_BATCH_ELEMENTS // per_sample))


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def extract_features(
    model: Medformer, split: MedMNISTSplit, dataset: str, *, batch_size: int = 512
) -> np.ndarray:
    """What a linear probe sees of a whole split (``Medformer.probe_features``), in eval mode (the
    model's mode is restored).

    Args:
        model: a Medformer built for ``dataset``.
        split: images to embed.
        dataset: MedMNIST flag (selects tokenizer and latents).
        batch_size: images per forward pass; lowered for large 3D volumes.

    Returns:
        float32 ``(N, model.probe_dim)``.
    """
    was_training = model.training
    model.eval()
    device = device_of(model)
    bs = _batch_size_for(split, batch_size)
    out = np.empty((len(split), model.probe_dim), dtype=np.float32)
    try:
        for start in range(0, len(split), bs):
            x, _ = split.batch(slice(start, start + bs), device=device)  # [B, C, *S] in [-1, 1]
            out[start : start + x.shape[0]] = model.probe_features(x, dataset).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def predict_scores(model: Medformer, split: MedMNISTSplit, dataset: str, task: str, *, batch_size: int) -> np.ndarray:
    """Head scores ``(N, C)`` of a whole split (caller sets eval mode)."""
    device = device_of(model)
    bs = _batch_size_for(split, batch_size)
    logits = [model(split.batch(slice(s, s + bs), device=device)[0], dataset).float().cpu()
              for s in range(0, len(split), bs)]
    return head_scores(torch.cat(logits), task)


def check_splits(splits: Mapping[str, MedMNISTSplit], dataset: str) -> None:
    missing = [s for s in ("train", "val", "test") if s not in splits]
    if missing:
        raise ValueError(f"splits lack {', '.join(missing)}; pass load_splits({dataset!r}, ...)")
    wrong = sorted({sp.flag for sp in splits.values()} - {dataset})
    if wrong:
        raise ValueError(f"splits hold {', '.join(wrong)} but dataset is {dataset!r}")
