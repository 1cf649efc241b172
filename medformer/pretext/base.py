"""The one interface every self-supervised pretext task implements.

A task builds its ``outputs.<name>`` head and returns one loss term per sample, ``[B]``; the
objective (:class:`medformer.pretext.PretextObjective`) takes their weighted mean. ``per_sample``
declares that sample i's term depends on sample i alone, so the batch loss is a sum of per-sample
terms: the condition DP-SGD's guarantee needs (Abadi et al. 2016).

``fixed_view_losses`` scores images under views fixed by a seed (a membership audit compares the
same views across images): by default the task's own randomness drawn from a seeded generator per
view; tasks whose randomness is per image (MAE masks, rotation classes) override it so that a
score does not depend on how images were batched.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from medformer.model import Medformer, MedformerConfig
from medformer.seeding import derived_seed


class PretextTask(ABC):
    """A self-supervised task: builds its head, returns per-sample loss terms."""

    name: ClassVar[str]
    per_sample: ClassVar[bool]

    @abstractmethod
    def build_head(self, cfg: MedformerConfig, datasets: Sequence[tuple[str, int]]) -> nn.Module:
        """The task's ``outputs.<name>`` module for these (flag, size) datasets."""

    @abstractmethod
    def losses(self, model: Medformer, x: torch.Tensor, dataset: str,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Loss terms [B] for a batch x of ``dataset`` (values in [-1, 1]); randomness from ``generator``."""

    def extra_inputs(self, datasets: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """Input kinds and sizes (``"2d-1ch"``, 28) the task needs besides the datasets' own."""
        return []

    def begin_round(self, model: Medformer) -> None:
        """Called once before a round's local training (e.g. to freeze a teacher)."""

    def after_step(self, model: Medformer) -> None:
        """Called after every optimizer step of local training (e.g. to move a teacher)."""

    def fixed_view_losses(self, model: Medformer, x: torch.Tensor, dataset: str, *, views: int,
                          seed: int) -> list[torch.Tensor]:
        """Loss terms [B] under each of ``views`` views fixed by ``seed``."""
        return [self.losses(model, x, dataset, torch.Generator().manual_seed(derived_seed(seed, self.name, v)))
                for v in range(views)]


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Images to flattened patches in the tokenizer's (row-major) order.

    2D: [B, C, H, W] -> [B, (H/p)(W/p), p*p*C];  3D: [B, C, D, H, W] -> [B, (D/p)(H/p)(W/p), p^3*C].
    """
    b, c, *spatial = x.shape
    g = [s // patch for s in spatial]
    if len(spatial) == 2:
        x = x.reshape(b, c, g[0], patch, g[1], patch).permute(0, 2, 4, 3, 5, 1)
    else:
        x = x.reshape(b, c, g[0], patch, g[1], patch, g[2], patch).permute(0, 2, 4, 6, 3, 5, 7, 1)
    n = 1
    for gi in g:
        n *= gi
    return x.reshape(b, n, -1)
