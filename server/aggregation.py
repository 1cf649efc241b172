"""Keyed aggregation: every parameter is combined over the hospitals that hold it.

Hospitals hold different subsets of the global model (a 2D hospital has no 3D tokenizer, each
dataset has its own latents). Each key is therefore averaged, weighted by examples, over the
replies that carry it; keys nobody sent keep their current global value. Robust rules (coordinate-
wise median, trimmed mean) and server optimizers (FedAvgM, FedAdam) work key by key the same way.
Pure numpy: no Flower types, so the maths is testable on its own.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Update:
    """One hospital's reply: its trained tensors and its weight (examples)."""

    name: str
    arrays: Arrays
    num_examples: int


def _holders(updates: Sequence[Update]) -> dict[str, list[Update]]:
    holders: dict[str, list[Update]] = {}
    for u in updates:
        for k in u.arrays:
            holders.setdefault(k, []).append(u)
    return holders


WEIGHTINGS = ("examples", "sqrt-examples", "uniform")


def site_weight(num_examples: int, weighting: str = "examples") -> float:
    """A site's weight in the mean: its examples (FedAvg), their square root, or 1 for every site.

    Example weighting lets the largest site own every shared key; the square root and uniform
    weights keep the small sites' say on the keys they share (a breast-ultrasound site of 546 images
    beside a chest X-ray site of 4,708 on the one 2D gray tokenizer).
    """
    if weighting == "examples":
        return float(num_examples)
    if weighting == "sqrt-examples":
        return math.sqrt(num_examples)
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"unknown weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")


def keyed_mean(updates: Sequence[Update], weighting: str = "examples") -> dict[str, np.ndarray]:
    """Per key: sum_i a_i w_i / sum_i a_i over the updates holding the key, a_i = ``site_weight``
    (float64 accumulation)."""
    out = {}
    for key, us in _holders(updates).items():
        weight = {u.name: site_weight(u.num_examples, weighting) for u in us}
        total = sum(weight.values())
        acc = np.zeros(np.shape(us[0].arrays[key]), dtype=np.float64)
        for u in us:
            acc += np.asarray(u.arrays[key], dtype=np.float64) * (weight[u.name] / total)
        out[key] = acc.astype(np.asarray(us[0].arrays[key]).dtype)
    return out


def keyed_median(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Per key: coordinate-wise median over the updates holding the key (FedMedian, unweighted)."""
    return {k: np.median(np.stack([u.arrays[k] for u in us]), axis=0).astype(np.asarray(us[0].arrays[k]).dtype)
            for k, us in _holders(updates).items()}


def keyed_trimmed_mean(updates: Sequence[Update], trim_fraction: float) -> dict[str, np.ndarray]:
    """Per key: coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest values."""
    out = {}
    for k, us in _holders(updates).items():
        stacked = np.sort(np.stack([u.arrays[k] for u in us]), axis=0)
        cut = int(trim_fraction * len(us))
        kept = stacked[cut : len(us) - cut] if len(us) - 2 * cut > 0 else stacked
        out[k] = kept.mean(axis=0).astype(stacked.dtype)
    return out


class ServerOptimizer:
    """Applies the aggregated pseudo-gradient (current - aggregate) with momentum or Adam, per key.

    ``fedavg``: w <- aggregate (server_lr 1). ``fedavgm``: v <- m v + delta; w <- w + lr v
    (Hsu et al. 2019). ``fedadam``: Adam on delta (Reddi et al. 2021, tau = 1e-3).
    """

    def __init__(self, name: str = "fedavg", *, lr: float = 1.0, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if name not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"unknown server optimizer {name!r}; choose from fedavg, fedavgm, fedadam")
        self.name, self.lr, self.momentum = name, lr, momentum
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.state: dict[str, dict[str, np.ndarray]] = {"m": {}, "v": {}}

    def apply(self, current: Arrays, aggregate: Arrays) -> dict[str, np.ndarray]:
        """New global arrays: keys in ``aggregate`` move, the rest stay as they are."""
        new = dict(current)
        for k, agg in aggregate.items():
            if self.name == "fedavg" and self.lr == 1.0:
                new[k] = agg
                continue
            cur = np.asarray(current[k], dtype=np.float64)
            delta = np.asarray(agg, dtype=np.float64) - cur
            if self.name == "fedavg":
                step = delta
            elif self.name == "fedavgm":
                v = self.state["m"].get(k, np.zeros_like(delta))
                step = self.momentum * v + delta
                self.state["m"][k] = step
            else:
                m = self.beta1 * self.state["m"].get(k, np.zeros_like(delta)) + (1 - self.beta1) * delta
                v = self.beta2 * self.state["v"].get(k, np.zeros_like(delta)) + (1 - self.beta2) * delta**2
                self.state["m"][k], self.state["v"][k] = m, v
                step = m / (np.sqrt(v) + self.tau)
            new[k] = (cur + self.lr * step).astype(np.asarray(current[k]).dtype)
        return new

    def state_dict(self) -> dict:
        return {"name": self.name, "m": dict(self.state["m"]), "v": dict(self.state["v"])}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds {state.get('name')!r} server-optimizer state, not {self.name!r}")
        self.state = {"m": dict(state["m"]), "v": dict(state["v"])}


def clip_update(sent: dict[str, np.ndarray], reply: dict[str, np.ndarray], clipping_norm: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """``sent + min(1, C / ||reply - sent||) (reply - sent)`` over the reply's keys, and the update's norm.

    Args:
        sent: what the hospital was sent, by key.
        reply: what it returned (a subset of ``sent``'s keys, same shapes), by key.
        clipping_norm: C, the largest L2 norm an update may have (over all its keys together).

    Returns:
        The clipped reply (same keys and dtypes as ``reply``) and the unclipped update's L2 norm.
    """
    delta = {k: np.asarray(v, dtype=np.float64) - np.asarray(sent[k], dtype=np.float64) for k, v in reply.items()}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    clipped = {k: (np.asarray(sent[k], dtype=np.float64) + scale * d).astype(np.asarray(reply[k]).dtype)
               for k, d in delta.items()}
    return clipped, norm
