"""Two-view tasks: two random views of each image (``medformer.data.random_view``) should agree.

* ``simsiam``: predictor + stop-gradient (Chen & He 2021); per-sample.
* ``contrastive``: NT-Xent with in-batch negatives (Chen et al. 2020); NOT per-sample, so never
  under DP-SGD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medformer.data import random_view
from medformer.layers import Mlp
from medformer.model import MedformerConfig
from medformer.pretext.base import PretextTask


class ProjectionHead(nn.Module):
    """Projector (and predictor for SimSiam) with LayerNorm instead of BatchNorm (Opacus)."""

    def __init__(self, cfg: MedformerConfig, predictor: bool):
        super().__init__()
        self.projector = nn.Sequential(nn.LayerNorm(cfg.dim), Mlp(cfg.dim, cfg.dim, cfg.dim))
        self.predictor = (nn.Sequential(nn.LayerNorm(cfg.dim), Mlp(cfg.dim, cfg.dim // 2, cfg.dim))
                          if predictor else nn.Identity())


class SimSiam(PretextTask):
    name = "simsiam"
    per_sample = True

    def build_head(self, cfg, datasets):
        return ProjectionHead(cfg, predictor=True)

    def losses(self, model, x, dataset, generator=None):
        head: ProjectionHead = model.outputs[self.name]
        z1 = head.projector(model.embed(random_view(x, generator), dataset))
        z2 = head.projector(model.embed(random_view(x, generator), dataset))
        p1, p2 = head.predictor(z1), head.predictor(z2)
        # Negative cosine similarity with stop-gradient on the target branch, symmetrised.
        return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1) + F.cosine_similarity(p2, z1.detach(), dim=-1))


class Contrastive(PretextTask):
    name = "contrastive"
    per_sample = False  # in-batch negatives: each term depends on the whole batch

    def __init__(self, *, temperature: float = 0.2):
        self.temperature = temperature

    def build_head(self, cfg, datasets):
        return ProjectionHead(cfg, predictor=False)

    def losses(self, model, x, dataset, generator=None):
        head: ProjectionHead = model.outputs[self.name]
        z = torch.cat([head.projector(model.embed(random_view(x, generator), dataset)) for _ in range(2)])
        z = F.normalize(z, dim=-1)
        b = x.shape[0]
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        per_view = F.cross_entropy(sim, target, reduction="none")
        return 0.5 * (per_view[:b] + per_view[b:])
