"""MedMNIST's official metrics and what feeds them: per-task head losses, head scores in medmnist's
``y_score`` format, and class-stratified label subsets.

Every score is computed with MedMNIST's official definitions (``medmnist.evaluator.getAUC`` /
``getACC``, Yang et al. 2023): binary = AUC of the positive score and accuracy at 0.5; multi-class
and ordinal = macro one-vs-rest AUC and argmax accuracy; multi-label = mean per-label AUC and
per-label accuracy at 0.5.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.evaluator import getACC, getAUC

TASKS: tuple[str, ...] = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")
METHODS: tuple[str, ...] = ("linear_probe", "fine_tune", "random_init")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown MedMNIST task {task!r}; expected one of {', '.join(map(repr, TASKS))}")


# --------------------------------------------------------------------------- losses and scores


def head_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Per-sample downstream loss for a MedMNIST task.

    Args:
        logits: head output ``[B, num_outputs]`` (see ``DatasetInfo.num_outputs``).
        labels: int labels ``[B, L]`` as stored (L = 1 except multi-label) or ``[B]``.
        task: ``medmnist.INFO[flag]["task"]``.

    Returns:
        ``[B]`` loss: cross-entropy (binary, multi-class); BCE-with-logits summed over labels
        (multi-label); BCE on the cumulative targets ``y > k`` summed over k (ordinal, n-1 logits).
    """
    _check_task(task)
    b = logits.shape[0]
    if task.startswith("multi-label"):
        target = labels.reshape(b, -1).to(logits.dtype)  # [B, L]
        if target.shape != logits.shape:
            raise ValueError(f"multi-label logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
    y = labels.reshape(-1).long()  # [B]
    if y.shape[0] != b:
        raise ValueError(f"{task} expects one label per sample; got labels {tuple(labels.shape)} for {b} logits")
    if task == "ordinal-regression":
        ks = torch.arange(logits.shape[1], device=logits.device)  # thresholds 0..n-2
        target = (y[:, None] > ks[None, :]).to(logits.dtype)  # [B, n-1]: 1 where y > k
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
    return F.cross_entropy(logits, y, reduction="none")


def head_scores(logits: torch.Tensor | np.ndarray, task: str) -> np.ndarray:
    """Head logits -> ``y_score`` in the format of ``medmnist.evaluator``.

    Args:
        logits: ``[N, num_outputs]``.
        task: ``medmnist.INFO[flag]["task"]``.

    Returns:
        float64 ``(N, C)``: softmax probabilities (binary: C = 2, multi-class: C = n); per-label
        sigmoids (multi-label); class probabilities from the cumulative ones (ordinal, C = n):
        ``p(y=k) = P(y>k-1) - P(y>k)``, clipped at 0 and renormalised.
    """
    _check_task(task)
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    if task.startswith("multi-label"):
        return torch.sigmoid(z).numpy()
    if task == "ordinal-regression":
        gt = torch.sigmoid(z)  # [N, n-1]: P(y > k)
        ones, zeros = torch.ones_like(gt[:, :1]), torch.zeros_like(gt[:, :1])
        cum = torch.cat([ones, gt, zeros], dim=1)  # [N, n+1]: P(y > k - 1) for k = 0..n
        probs = (cum[:, :-1] - cum[:, 1:]).clamp_min(0.0)  # [N, n]
        return (probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    return torch.softmax(z, dim=1).numpy()


def official_metrics(y_true: np.ndarray | torch.Tensor, y_score: np.ndarray, task: str) -> dict[str, float]:
    """MedMNIST's official AUC and ACC (``medmnist.evaluator.getAUC`` / ``getACC``).

    Args:
        y_true: labels ``(N, L)`` as stored in the npz.
        y_score: ``(N, C)`` scores as produced by :func:`head_scores` or ``predict_proba``.
        task: ``medmnist.INFO[flag]["task"]``.

    Returns:
        ``{"auc": float, "acc": float}``; AUC is NaN (sklearn warns) when a class never occurs.
    """
    _check_task(task)
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape[0] != y_score.shape[0]:
        raise ValueError(f"y_true has {y_true.shape[0]} rows but y_score has {y_score.shape[0]}")
    return {"auc": float(getAUC(y_true, y_score, task)), "acc": float(getACC(y_true, y_score, task))}


def selection_key(metrics: Mapping[str, float]) -> tuple[float, float]:
    """Model-selection order: validation AUC (NaN counts as worst), then accuracy."""
    auc = metrics["auc"]
    return (auc if math.isfinite(auc) else -math.inf, metrics["acc"])


# --------------------------------------------------------------------------- label subsets


def label_subset(
    labels: np.ndarray,
    task: str,
    *,
    fraction: float = 1.0,
    max_examples: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of a label-efficient training subset that keeps every class.

    Single-label tasks are sampled per class, proportionally (largest remainders), at least one
    example per class present. Multi-label: a random subset, topped up with one positive and one
    negative example for any label lacking them.

    Args:
        labels: ``(N, L)`` int labels.
        task: ``medmnist.INFO[flag]["task"]``.
        fraction: share of the examples to keep, in (0, 1].
        max_examples: optional cap on the subset size (before the one-per-class guarantee).
        seed: sampling seed.

    Returns:
        sorted int64 indices into ``labels``.
    """
    _check_task(task)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction!r}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_train_examples must be >= 1 or None, got {max_examples!r}")
    labels = np.asarray(labels).reshape(len(labels), -1)
    n = labels.shape[0]
    target = max(1, int(round(fraction * n)))
    if max_examples is not None:
        target = min(target, int(max_examples))
    if target >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if task.startswith("multi-label"):
        keep = np.zeros(n, dtype=bool)
        keep[rng.choice(n, size=target, replace=False)] = True
        for j in range(labels.shape[1]):
            for value in (1, 0):
                pool = np.flatnonzero(labels[:, j] == value)
                if pool.size and not np.any(labels[keep, j] == value):
                    keep[rng.choice(pool)] = True
        return np.flatnonzero(keep).astype(np.int64)
    y = labels[:, 0]
    classes, counts = np.unique(y, return_counts=True)
    exact = target * counts / n
    quota = np.minimum(np.maximum(1, np.floor(exact)).astype(np.int64), counts)
    while quota.sum() > target and quota.max() > 1:  # the one-per-class floor overshot: trim the largest
        quota[np.argmax(quota)] -= 1
    spare = target - int(quota.sum())
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable"):  # largest remainders first
        if spare <= 0:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
            spare -= 1
    parts = [rng.choice(np.flatnonzero(y == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def labelled_subsets(splits: Mapping, task: str, *, fraction: float = 1.0, max_examples: int | None = None,
                     seed: int = 0) -> tuple:
    """The (train, val) splits a label-efficient evaluation may use: both subsampled in the same
    proportion (class-stratified, at least one example per class, :func:`label_subset`), so a
    "1% of the labels" result chooses its settings on 1% of the validation labels too. Test is untouched.

    ``max_examples`` caps the train subset only (a speed cap, not a label budget).
    """
    train, val = splits["train"], splits["val"]
    train = train.subset(label_subset(train.labels, task, fraction=fraction, max_examples=max_examples, seed=seed))
    if fraction < 1.0:
        val = val.subset(label_subset(val.labels, task, fraction=fraction, seed=seed))
    return train, val
