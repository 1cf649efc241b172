"""Splitting one train split across several simulated clients: IID or Dirichlet label skew."""

from __future__ import annotations

import numpy as np

_MAX_DIRICHLET_DRAWS = 100


def _class_ids(labels: np.ndarray) -> np.ndarray:
    """One class id per example; multi-label rows are mapped to ids of their unique label sets."""
    labels = np.asarray(labels)
    if labels.ndim <= 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        return labels.reshape(-1)
    return np.unique(labels.reshape(len(labels), -1), axis=0, return_inverse=True)[1].reshape(-1)


def partition_indices(
    labels: np.ndarray, parts: int, method: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split example indices ``0..N-1`` into ``parts`` disjoint, non-empty, sorted index arrays.

    ``iid`` shuffles and splits into near-equal parts. ``dirichlet`` is the usual label-skew split
    (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution"; implemented per
    class as in Yurochkin et al. 2019 and NIID-Bench): for each class, proportions
    ``p ~ Dir(alpha * 1_parts)`` decide how its shuffled examples are cut across the parts.
    Draws are repeated until no part is empty; after ``100`` tries the examples needed are moved
    from the largest parts. Every index is used exactly once; the result depends only on the
    arguments.

    Args:
        labels: ``[N]`` or ``[N, 1]`` class labels, or ``[N, K]`` multi-label rows.
        parts: number of parts (>= 1, <= N).
        method: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (> 0); smaller is more skewed. Ignored for ``iid``.
        seed: seed of the generator.

    Returns:
        ``parts`` int64 arrays of indices into ``labels``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not isinstance(parts, (int, np.integer)) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")
    if n < parts:
        raise ValueError(f"cannot split {n} examples into {parts} non-empty parts")
    rng = np.random.default_rng(seed)
    if method == "iid":
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), parts)]
    if method != "dirichlet":
        raise ValueError(f"unknown partition method {method!r}; choose from 'iid', 'dirichlet'")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")

    classes = _class_ids(labels)
    members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    for _ in range(_MAX_DIRICHLET_DRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for idx in members:
            p = np.nan_to_num(rng.dirichlet(np.full(parts, float(alpha))))
            p = p / p.sum() if p.sum() > 0 else np.full(parts, 1.0 / parts)
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(int)
            for bucket, chunk in zip(buckets, np.split(rng.permutation(idx), cuts)):
                bucket.append(chunk)
        out = [np.concatenate(b) for b in buckets]
        if min(len(o) for o in out) > 0:
            break
    else:
        # Rare (tiny N or alpha): move one random example from the largest part to each empty one.
        for j in range(parts):
            if len(out[j]) == 0:
                big = int(np.argmax([len(o) for o in out]))
                k = int(rng.integers(len(out[big])))
                out[j] = out[big][k : k + 1]
                out[big] = np.delete(out[big], k)
    return [np.sort(o).astype(np.int64) for o in out]
