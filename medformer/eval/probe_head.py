"""A fitted linear probe as a torch module, so that it travels with an exported Medformer.

``medformer.eval.linear_probe(..., return_probe=True)`` gives the probe it chose: the train statistics
that standardise its features (``Medformer.probe_features``), and the affine map whose softmax
(sigmoid for multi-label) is the logistic regression's ``predict_proba``. Kept in float64, as the
probe computed its scores.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn


class LinearProbe(nn.Module):
    """Probe features [B, dim] -> standardised -> logits [B, C]; ``scores`` in medmnist's format.

    Args:
        dim: width of the features (``Medformer.probe_dim``).
        num_outputs: C, the score columns (classes, or labels for multi-label).
        activation: ``softmax`` (binary, multi-class, ordinal: class probabilities) or ``sigmoid``
            (multi-label: one probability per label).
    """

    def __init__(self, dim: int, num_outputs: int, activation: Literal["softmax", "sigmoid"] = "softmax"):
        super().__init__()
        assert activation in ("softmax", "sigmoid"), f"unknown probe activation {activation!r}"
        self.activation = activation

        def frozen(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=torch.float64), requires_grad=False)

        self.mean, self.std = frozen(dim), frozen(dim)
        self.weight, self.bias = frozen(num_outputs, dim), frozen(num_outputs)

    @classmethod
    def from_probe(cls, probe: Mapping[str, np.ndarray | str]) -> "LinearProbe":
        """From ``linear_probe(..., return_probe=True)["probe"]``."""
        weight = np.asarray(probe["weight"], dtype=np.float64)
        module = cls(weight.shape[1], weight.shape[0], str(probe["activation"]))
        with torch.no_grad():
            for name in ("mean", "std", "weight", "bias"):
                getattr(module, name).copy_(torch.from_numpy(np.asarray(probe[name], dtype=np.float64)))
        return module

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        z = (feats.to(torch.float64) - self.mean) / self.std
        return z @ self.weight.T + self.bias

    @torch.no_grad()
    def scores(self, feats: torch.Tensor | np.ndarray) -> np.ndarray:
        """float64 ``(N, C)`` scores, as the probe's ``predict_proba`` gave them."""
        logits = self(torch.as_tensor(feats, device=self.weight.device)).cpu()
        out = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)
        return out.numpy()
