"""Rotation prediction (``rotation``; Gidaris et al. 2018): predict which rotation was applied.

4 classes in 2D; in 3D the identity plus 90/180/270 degrees about each of the three axes (10 classes).
``rotation`` shares one classifier per dimensionality across datasets; ``site_rotation`` gives each
dataset its own (keyed ``outputs.site_rotation.heads.<dataset>``, so the server averages it only over
the sites that hold that dataset). Why: which way is up differs between modalities, and under one shared
classifier the largest site's cues win (in a 2D federation pneumonia's rotation loss fell to 0.01 while
breast's rose above chance, ``benchmarks/results/pretext-c-val/``).
"""
from __future__ import annotations

from collections.abc import Mapping

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
    """Linear classifiers over the pooled features, one per key: [B, dim] -> [B, rotations of the key's ndim]."""

    def __init__(self, cfg: MedformerConfig, ndim_of: Mapping[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict(
            {key: nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, num_rotations(n)))
             for key, n in sorted(ndim_of.items())}
        )

    def forward(self, feats: torch.Tensor, key: str) -> torch.Tensor:
        return self.heads[key](feats)


class RotationPrediction(PretextTask):
    """One classifier per dimensionality (``heads.2d``, ``heads.3d``), shared by every dataset of it."""

    name = "rotation"
    per_sample = True

    @staticmethod
    def head_key(dataset: str, ndim: int) -> str:
        return f"{ndim}d"

    def build_head(self, cfg, datasets):
        ndim_of = {}
        for flag, _ in datasets:
            ndim = 3 if get_info(flag).is_3d else 2
            ndim_of[self.head_key(flag, ndim)] = ndim
        return RotationHead(cfg, ndim_of)

    def rotated_losses(self, model: Medformer, x: torch.Tensor, dataset: str, labels: torch.Tensor) -> torch.Tensor:
        """Loss terms [B] with each sample's rotation class fixed by ``labels`` [B]."""
        feats = model.embed(rotate(x, labels), dataset)
        logits = model.outputs[self.name](feats, self.head_key(dataset, x.dim() - 2))
        return F.cross_entropy(logits, labels, reduction="none")

    def losses(self, model, x, dataset, generator=None):
        labels = torch.randint(0, num_rotations(x.dim() - 2), (x.shape[0],), generator=generator).to(x.device)
        return self.rotated_losses(model, x, dataset, labels)

    def fixed_view_losses(self, model, x, dataset, *, views, seed):
        """Every rotation class once (the views are the classes; ``views`` and ``seed`` do not apply)."""
        return [self.rotated_losses(model, x, dataset, torch.full((x.shape[0],), c, device=x.device))
                for c in range(num_rotations(x.dim() - 2))]


class SiteRotation(RotationPrediction):
    """Rotation prediction with each dataset's own classifier (``heads.<dataset>``; see the module)."""

    name = "site_rotation"

    @staticmethod
    def head_key(dataset: str, ndim: int) -> str:
        return dataset
