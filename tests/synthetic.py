"""Small synthetic MedMNIST files in the official format, for fast tests (never for claims about learning).

A class-dependent blob makes the labels learnable; the files' MD5s are not the official ones, so
load them with ``verify=False``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from medformer.data import SPLITS, DatasetInfo, file_name, get_info

def _blob_masks(n_masks: int, size: int, ndim: int, *, central: bool) -> np.ndarray:
    """``n_masks`` soft blobs (float32, shape (n_masks, size, ..., size)) at distinct places."""
    grid = np.meshgrid(*([np.linspace(-1.0, 1.0, size, dtype=np.float32)] * ndim), indexing="ij")
    masks = np.zeros((n_masks,) + (size,) * ndim, dtype=np.float32)
    for m in range(n_masks):
        if central:  # growing blob at the centre (ordinal)
            centre, radius = [0.0] * ndim, 0.2 + 0.5 * m / max(n_masks - 1, 1)
        else:  # same-size blob on a ring
            a = 2 * np.pi * m / max(n_masks, 1)
            centre = [0.5 * np.cos(a), 0.5 * np.sin(a)] + [0.5 * np.cos(2 * a)] * (ndim - 2)
            radius = 0.3
        d2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        masks[m] = np.exp(-d2 / (2 * (radius / 1.5) ** 2))
    return masks


def _synthetic_split(info: DatasetInfo, size: int, n: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    k = info.n_classes
    ndim = 3 if info.is_3d else 2
    if info.is_multi_label:
        labels = (rng.random((n, k)) < 0.3).astype(np.uint8)
        if n >= 2:  # every label has both values
            labels[0] = 1
            labels[1] = 0
        masks = _blob_masks(k, size, ndim, central=False).reshape(k, -1)
        signal = labels.astype(np.float32) @ masks
    else:
        labels = rng.permutation(np.arange(n) % k).astype(np.uint8).reshape(n, 1)
        if info.task == "binary-class":  # bright blob only for positives
            masks = np.concatenate([np.zeros((1,) + (size,) * ndim, np.float32),
                                    _blob_masks(1, size, ndim, central=True)])
        else:
            masks = _blob_masks(k, size, ndim, central=info.task == "ordinal-regression")
        signal = masks.reshape(k, -1)[labels[:, 0]]
    spatial = (size,) * ndim
    signal = signal.reshape((n,) + spatial)
    noise = rng.normal(60.0, 20.0, size=(n,) + spatial).astype(np.float32)
    img = noise + 150.0 * np.minimum(signal, 1.0)
    if info.n_channels == 3 and not info.is_3d:
        tint = np.array([1.0, 0.8, 0.6], dtype=np.float32)
        img = img[..., None] * tint
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def write_synthetic_npz(
    directory: str | os.PathLike[str],
    flag: str,
    *,
    size: int = 28,
    n_train: int = 64,
    n_val: int = 16,
    n_test: int = 16,
    seed: int = 0,
) -> Path:
    """Write ``<directory>/<file_name(flag, size)>`` in the official format with a learnable signal.

    uint8 images (N, H, W) gray / (N, H, W, 3) RGB / (N, D, H, W) 3D, uint8 labels (N, 1) or
    (N, L) multi-label; a class-dependent blob makes labels learnable. Written atomically. Its MD5
    is not the official one: load it with ``verify=False``.
    """
    info = get_info(flag)
    name = file_name(flag, size)
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _synthetic_split(info, size, n, rng)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, out_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_dir / name
