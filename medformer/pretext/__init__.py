"""Self-supervised pretext tasks, one interface (``base.PretextTask``), 2D and 3D alike.

``mae``          masked reconstruction (``mae.py``)
``rotation``     rotation prediction, one classifier per dimensionality (``rotation.py``)
``site_rotation`` rotation prediction, one classifier per dataset (``rotation.py``)
``simsiam``      two views, predictor + stop-gradient (``two_view.py``)
``contrastive``  two views, in-batch negatives: not per-sample, refused under DP-SGD (``two_view.py``)
``distill``      two views, an EMA teacher, no negatives (BYOL; ``distill.py``)
``bridge``       ours: 3D sites' volumes seen through the 2D tokenizer as projections (``bridge.py``)

:class:`PretextObjective` weights several tasks; :func:`build_pretext_model` builds a Medformer that
carries their heads (``outputs.<task>``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from medformer.model import DatasetRef, Medformer, MedformerConfig, build_medformer, normalise_datasets
from medformer.pretext.base import PretextTask, patchify
from medformer.pretext.bridge import DimensionBridge
from medformer.pretext.distill import SelfDistillation
from medformer.pretext.mae import MAEDecoder, MaskedReconstruction
from medformer.pretext.rotation import RotationPrediction, SiteRotation, num_rotations, rotate
from medformer.pretext.two_view import Contrastive, SimSiam

__all__ = ["TASKS", "Contrastive", "DimensionBridge", "MAEDecoder", "MaskedReconstruction", "PretextObjective",
           "PretextTask", "RotationPrediction", "SelfDistillation", "SimSiam", "SiteRotation", "build_pretext_model",
           "num_rotations", "patchify", "rotate"]

TASKS: dict[str, type[PretextTask]] = {
    t.name: t for t in (MaskedReconstruction, RotationPrediction, SiteRotation, SimSiam, Contrastive,
                        SelfDistillation, DimensionBridge)
}


class PretextObjective:
    """Weighted combination of pretext tasks.

    Args:
        weights: task name -> weight (> 0), e.g. ``{"mae": 1.0, "rotation": 0.5}``.
        mask_ratio: fraction of patches masked by ``mae``.
    """

    def __init__(self, weights: Mapping[str, float], *, mask_ratio: float = 0.75):
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown pretext task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if not weights:
            raise ValueError("at least one pretext task is needed")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"pretext weights must be > 0, got {bad}")
        if set(weights) == {"bridge"}:
            raise ValueError("bridge needs another pretext task beside it: at 2D sites its loss is 0")
        self.weights = dict(weights)
        self.tasks: dict[str, PretextTask] = {
            n: MaskedReconstruction(mask_ratio=mask_ratio) if n == "mae" else TASKS[n]() for n in weights
        }

    @property
    def per_sample(self) -> bool:
        """True when the combined loss is a sum of per-sample terms (DP-SGD may run it)."""
        return all(t.per_sample for t in self.tasks.values())

    def non_per_sample_tasks(self) -> list[str]:
        return [n for n, t in self.tasks.items() if not t.per_sample]

    def dp_objection(self) -> str | None:
        """Why DP-SGD cannot protect this objective (its batch-coupled tasks), or None if it can."""
        if self.per_sample:
            return None
        return (f"pretext task(s) {', '.join(self.non_per_sample_tasks())} are not sums of per-sample losses; "
                "DP-SGD cannot protect them")

    def build_heads(self, cfg: MedformerConfig, datasets: Sequence[DatasetRef]) -> dict[str, nn.Module]:
        ds = normalise_datasets(datasets)
        return {n: t.build_head(cfg, ds) for n, t in self.tasks.items()}

    def extra_inputs(self, datasets: Sequence[DatasetRef]) -> list[tuple[str, int]]:
        """Input kinds and sizes the tasks need besides the datasets' own (``bridge``: the 2D tokenizer)."""
        ds = normalise_datasets(datasets)
        return list(dict.fromkeys(k for t in self.tasks.values() for k in t.extra_inputs(ds)))

    def begin_round(self, model: Medformer) -> None:
        for t in self.tasks.values():
            t.begin_round(model)

    def after_step(self, model: Medformer) -> None:
        for t in self.tasks.values():
            t.after_step(model)

    def __call__(self, model: Medformer, x: torch.Tensor, dataset: str,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean of the weighted per-sample terms, and each task's mean loss."""
        total = torch.zeros(x.shape[0], device=x.device)
        parts: dict[str, float] = {}
        for name, task in self.tasks.items():
            terms = task.losses(model, x, dataset, generator)
            total = total + self.weights[name] * terms
            parts[name] = float(terms.detach().mean()) if terms.numel() else 0.0
        return total.mean(), parts


def build_pretext_model(cfg: MedformerConfig, datasets: Sequence[DatasetRef], objective: PretextObjective,
                        *, downstream_heads: bool = False) -> Medformer:
    """A Medformer carrying the objective's pretext heads (a hospital's model has no downstream heads)."""
    return build_medformer(cfg, datasets, downstream_heads=downstream_heads,
                           extra_outputs=objective.build_heads(cfg, datasets),
                           extra_inputs=objective.extra_inputs(datasets))
