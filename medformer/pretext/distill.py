"""Two-view self-distillation with an EMA teacher (``distill``; BYOL, Grill et al. 2020).

The student's prediction for one random view of an image should match the teacher's projection of
another view of the same image: ``2 - 2 cos(predictor(projector(embed(v1))), sg(teacher(v2)))``,
symmetrised. The teacher is a frozen copy of the model taken when the round begins (the global
weights the site received) and moved towards the student after every step (momentum 0.99). The
loss of image i depends on image i alone (no batch statistics, no negatives): DP-SGD may run it,
and the teacher, a function of released weights and of the site's own DP-trained ones, is
post-processing.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medformer.data import random_view
from medformer.layers import Mlp
from medformer.model import Medformer, MedformerConfig
from medformer.pretext.base import PretextTask


class DistillHead(nn.Module):
    """Projector and predictor with LayerNorm (no BatchNorm: Opacus, and per-sample losses)."""

    def __init__(self, cfg: MedformerConfig):
        super().__init__()
        self.projector = nn.Sequential(nn.LayerNorm(cfg.dim), Mlp(cfg.dim, 2 * cfg.dim, cfg.dim))
        self.predictor = nn.Sequential(nn.LayerNorm(cfg.dim), Mlp(cfg.dim, 2 * cfg.dim, cfg.dim))


class SelfDistillation(PretextTask):
    name = "distill"
    per_sample = True

    def __init__(self, *, momentum: float = 0.99):
        self.momentum = momentum
        self._teacher: Medformer | None = None

    def build_head(self, cfg, datasets):
        return DistillHead(cfg)

    def begin_round(self, model):
        self._teacher = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def after_step(self, model):
        if self._teacher is None:
            return
        for t, s in zip(self._teacher.parameters(), model.parameters()):
            t.mul_(self.momentum).add_(s.detach(), alpha=1 - self.momentum)

    def _targets(self, model: Medformer, views: list[torch.Tensor], dataset: str) -> list[torch.Tensor]:
        # Outside local training (evaluation, the privacy audit) the model is its own stop-grad teacher.
        teacher = self._teacher if (self._teacher is not None and model.training) else model
        with torch.no_grad():
            head = teacher.outputs[self.name]
            return [head.projector(teacher.embed(v, dataset)) for v in views]

    def view_losses(self, model: Medformer, v1: torch.Tensor, v2: torch.Tensor, dataset: str) -> torch.Tensor:
        """Loss terms [B] for two given views of a batch."""
        head: DistillHead = model.outputs[self.name]
        t1, t2 = self._targets(model, [v1, v2], dataset)
        p1, p2 = (head.predictor(head.projector(model.embed(v, dataset))) for v in (v1, v2))
        return 2 - F.cosine_similarity(p1, t2, dim=-1) - F.cosine_similarity(p2, t1, dim=-1)

    def losses(self, model, x, dataset, generator=None):
        return self.view_losses(model, random_view(x, generator), random_view(x, generator), dataset)
