"""Rotation prediction (``rotation``; Gidaris et al. 2018): predict which rotation was applied.

4 classes in 2D; in 3D the identity plus 90/180/270 degrees about each of the three axes (10 classes).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medformer.data import get_info
from medformer.model import Medformer, MedformerConfig
from medformer.pretext.base import PretextTask

_PLANES_3D = ((2, 3), (2, 4), (3, 4))  # rotations about the W, H and D axes of [B, C, D, H, W]


def num_rotations(ndim: int) -> int:
    return 4 if ndim == 2 else 1 + 3 * len(_PLANES_3D)


def rotate(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotate each sample by its label's rotation (see module docstring for the classes)."""
    out = x.clone()
    ndim = x.dim() - 2
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        if ndim == 2:
            out[idx] = torch.rot90(x[idx], c, dims=(2, 3))
        elif c > 0:
            plane = _PLANES_3D[(c - 1) // 3]
            out[idx] = torch.rot90(x[idx], (c - 1) % 3 + 1, dims=plane)
    return out


class RotationHead(nn.Module):
    """A linear classifier over the pooled features per dimensionality: [B, dim] -> [B, rotations]."""

    def __init__(self, cfg: MedformerConfig, ndims: Sequence[int]):
        super().__init__()
        self.heads = nn.ModuleDict(
            {f"{n}d": nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, num_rotations(n)))
             for n in sorted(set(ndims))}
        )

    def forward(self, feats: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.heads[f"{ndim}d"](feats)


class RotationPrediction(PretextTask):
    name = "rotation"
    per_sample = True

    def build_head(self, cfg, datasets):
        return RotationHead(cfg, [3 if get_info(f).is_3d else 2 for f, _ in datasets])

    def rotated_losses(self, model: Medformer, x: torch.Tensor, dataset: str, labels: torch.Tensor) -> torch.Tensor:
        """Loss terms [B] with each sample's rotation class fixed by ``labels`` [B]."""
        ndim = x.dim() - 2
        feats = model.embed(rotate(x, labels), dataset)
        return F.cross_entropy(model.outputs[self.name](feats, ndim), labels, reduction="none")

    def losses(self, model, x, dataset, generator=None):
        labels = torch.randint(0, num_rotations(x.dim() - 2), (x.shape[0],), generator=generator).to(x.device)
        return self.rotated_losses(model, x, dataset, labels)

    def fixed_view_losses(self, model, x, dataset, *, views, seed):
        """Every rotation class once (the views are the classes; ``views`` and ``seed`` do not apply)."""
        return [self.rotated_losses(model, x, dataset, torch.full((x.shape[0],), c, device=x.device))
                for c in range(num_rotations(x.dim() - 2))]
