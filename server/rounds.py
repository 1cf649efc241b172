"""A round on the server side, without Flower: which sites train, which replies count, and how the
valid ones become the next global model.

``KeyedFedAvg`` (``server.strategy``) wraps these for Flower's messages; the quality and systems
benchmarks call them directly with ``client.round.train_round``'s results, so both run the same
aggregation code.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from server.aggregation import (WEIGHTINGS, Arrays, ServerOptimizer, Update, clip_update, keyed_mean, keyed_median,
                                keyed_trimmed_mean)
from server.client_dp import ClientLevelDP

RULES = ("mean", "median", "trimmed-mean")


def sample_nodes(nodes: Iterable[int], server_round: int, *, fraction: float, min_nodes: int,
                 seed: int) -> list[int]:
    """Sorted node ids that train in a round: ``max(ceil(fraction n), min_nodes)`` of the n nodes,
    drawn from (seed, round): reproducible and resumable (and public: see server.client_dp)."""
    nodes = sorted(nodes)
    k = min(len(nodes), max(math.ceil(fraction * len(nodes)), min_nodes))
    rng = np.random.default_rng([seed, server_round])
    return sorted(nodes[i] for i in rng.permutation(len(nodes))[:k])


def check_reply(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], num_examples: object, *,
                site_examples: int) -> str | None:
    """Why a site's reply cannot be averaged (keys outside what it was sent, wrong shape or dtype,
    non-finite values, an implausible example count), or None when it can."""
    if not isinstance(num_examples, (int, float)) or not num_examples > 0 or num_examples > 10 * max(1, site_examples):
        return f"implausible num-examples {num_examples!r} (site has {site_examples})"
    extra = sorted(set(reply) - set(sent))
    if extra:
        return f"sent keys outside its scope: {', '.join(extra[:3])}"
    for k, a in reply.items():
        ref = sent[k]
        if list(a.shape) != list(ref.shape) or str(a.dtype) != str(ref.dtype):
            return f"key {k}: got {a.dtype}{list(a.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if not np.all(np.isfinite(a)):
            return f"key {k}: non-finite values"
    return None


@dataclass
class Aggregator:
    """Valid updates -> the next global model, key by key.

    Args:
        rule: ``mean`` (weighted as ``weighting`` says), ``median`` or ``trimmed-mean`` (unweighted).
        weighting: the mean's site weights (``aggregation.site_weight``): examples, sqrt-examples, uniform.
        trim_fraction: for ``trimmed-mean``.
        server_optimizer: applied to the aggregate (FedAvg, FedAvgM, FedAdam).
        update_clip_norm: clip each update (reply - sent, over its keys) to this L2 norm first; None = off.
        client_dp: client-level DP (each update clipped, equal weights, the mean noised before the
            server optimizer); needs the mean rule.
    """

    rule: str = "mean"
    weighting: str = "examples"
    trim_fraction: float = 0.2
    server_optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    update_clip_norm: float | None = None
    client_dp: ClientLevelDP | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if self.rule not in RULES:
            raise ValueError(f"unknown aggregation rule {self.rule!r}; choose from {', '.join(RULES)}")
        if self.client_dp is not None and self.rule != "mean":
            raise ValueError(f"client-level DP needs the mean aggregation rule, not {self.rule!r}: the noise is "
                             "calibrated to the sensitivity of an average of clipped updates")

    def combine(self, current: Arrays, sent: Mapping[str, Arrays], updates: list[Update]) -> dict[str, np.ndarray]:
        """The next global arrays from the current ones and the round's valid updates.

        ``sent[name]`` is what site ``name`` was sent (its clipping reference). Keys nobody sent
        back keep their value. The order of ``updates`` does not matter (sorted by site name here:
        reproducible sums).
        """
        updates = sorted(updates, key=lambda u: u.name)
        if self.update_clip_norm is not None:
            updates = [Update(u.name, clip_update(sent[u.name], u.arrays, self.update_clip_norm)[0], u.num_examples)
                       for u in updates]
        if self.client_dp is not None:
            mean = self.client_dp.noised_mean(sent, updates)
        elif self.rule == "median":
            mean = keyed_median(updates)
        elif self.rule == "trimmed-mean":
            mean = keyed_trimmed_mean(updates, self.trim_fraction)
        else:
            mean = keyed_mean(updates, self.weighting)
        # A stateful server optimizer (FedAvgM, FedAdam) only ever sees the (noised) mean.
        return self.server_optimizer.apply(current, mean)
