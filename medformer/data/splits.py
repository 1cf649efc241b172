"""One split of one MedMNIST subset in memory, and the one uint8 -> float scaling used everywhere.

Images stay ``uint8`` in memory (channel-first); :func:`to_float` maps them to float32 in ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from medformer.data.registry import DatasetInfo, get_info

def to_float(x_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (``x / 127.5 - 1``); the one scaling used everywhere."""
    x = torch.from_numpy(np.asarray(x_uint8)) if isinstance(x_uint8, np.ndarray) else x_uint8
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"to_float expects uint8 pixels, got {got}")
    return x.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass(eq=False)
class MedMNISTSplit(Dataset):
    """One split of one subset, in memory as uint8 (channel-first) and int64 labels.

    ``images``: 2D ``(N, C, H, W)``, 3D ``(N, 1, D, H, W)``; ``labels``: ``(N, L)``, L = 1 except
    multi-label. ``ds[i]`` gives ``(float32 image, int64 labels of shape (L,))``.
    """

    flag: str
    split: str
    size: int
    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def info(self) -> DatasetInfo:
        return get_info(self.flag)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(torch.from_numpy(self.images[i]))
        y = torch.from_numpy(np.asarray(self.labels[i], dtype=np.int64))
        return x, y

    def batch(self, idx: np.ndarray | slice | Iterable[int], *, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised batch: ``(float32 (B, C, ...), int64 (B, L))``, on ``device`` (default: the CPU).

        The one place data moves to the model's device: the uint8 pixels travel, then are scaled there.
        """
        if not isinstance(idx, slice):
            idx = np.asarray(idx, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        y = torch.from_numpy(np.ascontiguousarray(self.labels[idx], dtype=np.int64))
        if device is not None:
            x, y = x.to(device), y.to(device)
        return to_float(x), y

    def subset(self, idx: np.ndarray | slice | Iterable[int]) -> "MedMNISTSplit":
        """A new split holding only ``idx`` (copies for index arrays, views for slices)."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx, dtype=np.int64)
        return MedMNISTSplit(self.flag, self.split, self.size, self.images[idx], self.labels[idx])

    def __repr__(self) -> str:
        return (
            f"MedMNISTSplit(flag={self.flag!r}, split={self.split!r}, size={self.size}, "
            f"n={len(self)}, images={tuple(self.images.shape)})"
        )
