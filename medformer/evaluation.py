"""Downstream evaluation of a (pre)trained Medformer encoder on labelled MedMNIST splits.

* :func:`linear_probe`: frozen encoder, standardised pooled features, L2 logistic regression with the
  strength chosen on the validation split (the protocol of SimCLR / MAE linear evaluation).
* :func:`fine_tune`: end-to-end training of a copy of the model with the downstream head; the epoch
  with the best validation AUC is kept.
* :func:`random_init_reference`: the same linear probe on an untrained Medformer (``random_init``).

Every score is computed with MedMNIST's official definitions (``medmnist.evaluator.getAUC`` /
``getACC``, Yang et al. 2023): binary = AUC of the positive score and accuracy at 0.5; multi-class
and ordinal = macro one-vs-rest AUC and argmax accuracy; multi-label = mean per-label AUC and
per-label accuracy at 0.5. :func:`head_scores` turns head logits into the ``y_score`` those
functions expect.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.evaluator import getACC, getAUC
from threadpoolctl import threadpool_limits
from torch import nn

from medformer.data import MedMNISTSplit, get_info
from medformer.layers import init_weights
from medformer.model import DatasetRef, Medformer, MedformerConfig, TaskHead
from medformer.pretext import augment as random_view

__all__ = [
    "TASKS",
    "METHODS",
    "head_loss",
    "head_scores",
    "official_metrics",
    "label_subset",
    "extract_features",
    "linear_probe",
    "fine_tune",
    "evaluate_encoder",
    "random_init_reference",
]

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")
METHODS: tuple[str, ...] = ("linear_probe", "fine_tune", "random_init")
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
# Largest input batch fed to the encoder at once, in float32 elements (64 MiB): 64 volumes of 64^3,
# ~760 of 28^3; 2D batches are never limited by it.
_MAX_BATCH_ELEMENTS = 1 << 24


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


def _selection_key(metrics: Mapping[str, float]) -> tuple[float, float]:
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


# --------------------------------------------------------------------------- features


def _batch_size_for(split: MedMNISTSplit, batch_size: int) -> int:
    """``batch_size`` capped so one input batch stays under ``_MAX_BATCH_ELEMENTS`` floats."""
    per_sample = int(np.prod(split.images.shape[1:])) or 1
    return max(1, min(batch_size, _MAX_BATCH_ELEMENTS // per_sample))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def extract_features(
    model: Medformer, split: MedMNISTSplit, dataset: str, *, batch_size: int = 512
) -> np.ndarray:
    """Pooled encoder features of a whole split, in eval mode (the model's mode is restored).

    Args:
        model: a Medformer built for ``dataset``.
        split: images to embed.
        dataset: MedMNIST flag (selects tokenizer and latents).
        batch_size: images per forward pass; lowered for large 3D volumes.

    Returns:
        float32 ``(N, dim)``.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    bs = _batch_size_for(split, batch_size)
    out = np.empty((len(split), model.cfg.dim), dtype=np.float32)
    try:
        for start in range(0, len(split), bs):
            x, _ = split.batch(slice(start, start + bs))  # [B, C, *S] in [-1, 1]
            out[start : start + x.shape[0]] = model.embed(x.to(device), dataset).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _predict_scores(model: Medformer, split: MedMNISTSplit, dataset: str, task: str, *, batch_size: int) -> np.ndarray:
    """Head scores ``(N, C)`` of a whole split (caller sets eval mode)."""
    device = _device(model)
    bs = _batch_size_for(split, batch_size)
    logits = [model(split.batch(slice(s, s + bs))[0].to(device), dataset).float().cpu()
              for s in range(0, len(split), bs)]
    return head_scores(torch.cat(logits), task)


def _check_splits(splits: Mapping[str, MedMNISTSplit], dataset: str) -> None:
    missing = [s for s in ("train", "val", "test") if s not in splits]
    if missing:
        raise ValueError(f"splits lack {', '.join(missing)}; pass load_splits({dataset!r}, ...)")
    wrong = sorted({sp.flag for sp in splits.values()} - {dataset})
    if wrong:
        raise ValueError(f"splits hold {', '.join(wrong)} but dataset is {dataset!r}")


# --------------------------------------------------------------------------- linear probe


def _fit_logreg(x: np.ndarray, y: np.ndarray, task: str, n_classes: int, c: float
                ) -> Callable[[np.ndarray], np.ndarray]:
    """Fit L2 logistic regression; return ``x -> y_score`` in medmnist's format."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def make() -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000, tol=1e-4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if task.startswith("multi-label"):  # one binary classifier per label
            fits: list[LogisticRegression | float] = []
            for j in range(y.shape[1]):
                yj = y[:, j]
                fits.append(float(yj[0]) if np.all(yj == yj[0]) else make().fit(x, yj))

            def predict(z: np.ndarray) -> np.ndarray:
                cols = [np.full(len(z), f) if isinstance(f, float) else f.predict_proba(z)[:, 1] for f in fits]
                return np.stack(cols, axis=1)  # (N, L) sigmoid scores

            return predict
        yc = y[:, 0]
        classes = np.unique(yc)
        if classes.size == 1:  # degenerate: one class only

            def predict(z: np.ndarray) -> np.ndarray:
                out = np.zeros((len(z), n_classes))
                out[:, classes[0]] = 1.0
                return out

            return predict
        clf = make().fit(x, yc)  # lbfgs: multinomial for > 2 classes (ordinal as multi-class)

        def predict(z: np.ndarray) -> np.ndarray:
            out = np.zeros((len(z), n_classes))
            out[:, clf.classes_] = clf.predict_proba(z)  # classes absent from train get 0
            return out

        return predict


def linear_probe(
    model: Medformer,
    splits: Mapping[str, MedMNISTSplit],
    dataset: str,
    *,
    label_fraction: float = 1.0,
    max_train_examples: int | None = None,
    seed: int = 0,
    Cs: Iterable[float] = DEFAULT_CS,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Linear evaluation of the frozen encoder.

    Features are standardised with train statistics; an L2 logistic regression (multinomial for
    multi-class and ordinal, one per label for multi-label) is fitted for each ``C`` in ``Cs`` and
    the one with the best validation AUC is scored on test.

    Args:
        model: Medformer built for ``dataset`` (not modified).
        splits: ``{"train", "val", "test"}`` splits of ``dataset``.
        dataset: MedMNIST flag.
        label_fraction: share of train labels used (class-stratified, >= 1 per class).
        max_train_examples: optional cap on train examples (stratified too).
        seed: seed of the label subset; the fit itself is deterministic.
        Cs: inverse L2 strengths to try.
        batch_size: images per forward pass when extracting features.

    Returns:
        ``auc``, ``acc`` (test, official), ``val_auc``, ``val_acc``, ``C``, ``n_train``, ``seconds``.
    """
    t0 = time.perf_counter()
    _check_splits(splits, dataset)
    info = get_info(dataset)
    train = splits["train"]
    idx = label_subset(train.labels, info.task, fraction=label_fraction, max_examples=max_train_examples, seed=seed)
    train = train.subset(idx)
    feats = {name: extract_features(model, sp, dataset, batch_size=batch_size)
             for name, sp in (("train", train), ("val", splits["val"]), ("test", splits["test"]))}
    mean = feats["train"].mean(axis=0, dtype=np.float64)
    std = feats["train"].std(axis=0, dtype=np.float64) + 1e-6
    z = {k: (v - mean) / std for k, v in feats.items()}  # (N, dim) float64

    best: tuple[tuple[float, float], float, Callable[[np.ndarray], np.ndarray], dict[str, float]] | None = None
    # NOTE: one BLAS thread: on (N, 128) problems multi-threaded BLAS is 10-30x slower on 2 shared cores.
    with threadpool_limits(limits=1, user_api="blas"):
        for c in Cs:
            predict = _fit_logreg(z["train"], train.labels, info.task, info.n_classes, float(c))
            val = official_metrics(splits["val"].labels, predict(z["val"]), info.task)
            log.debug("linear probe %s C=%g: val auc %.4f acc %.4f", dataset, c, val["auc"], val["acc"])
            if best is None or _selection_key(val) > best[0]:
                best = (_selection_key(val), float(c), predict, val)
        if best is None:
            raise ValueError("Cs is empty; give at least one L2 strength")
        _, c_best, predict, val = best
        test = official_metrics(splits["test"].labels, predict(z["test"]), info.task)
    result = {
        "auc": test["auc"], "acc": test["acc"], "val_auc": val["auc"], "val_acc": val["acc"],
        "C": c_best, "n_train": len(train), "seconds": time.perf_counter() - t0,
    }
    log.info("linear probe %s: test auc %.4f acc %.4f (C=%g, n_train=%d, %.1fs)",
             dataset, result["auc"], result["acc"], c_best, len(train), result["seconds"])
    return result


# --------------------------------------------------------------------------- fine-tuning


def fine_tune(
    model: Medformer,
    splits: Mapping[str, MedMNISTSplit],
    dataset: str,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    encoder_lr: float | None = None,
    batch_size: int = 128,
    label_fraction: float = 1.0,
    weight_decay: float = 0.05,
    seed: int = 0,
    max_train_examples: int | None = None,
    augment: bool = False,
    validations: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """End-to-end fine-tuning of a copy of ``model`` with the downstream head of ``dataset``.

    AdamW (no decay on 1-D parameters), cosine learning-rate decay per step, validation after each
    epoch; the weights of the epoch with the best validation AUC are scored on test. A model
    without an ``outputs.<dataset>`` head gets a fresh one (seeded).

    Args:
        model: Medformer built for ``dataset``; never modified.
        splits: ``{"train", "val", "test"}`` splits of ``dataset``.
        dataset: MedMNIST flag.
        epochs: passes over the (subsampled) train split.
        lr: peak learning rate of the head.
        encoder_lr: peak learning rate of the encoder (inputs, latents, body); default ``lr / 3``.
        batch_size: training batch size (evaluation batches may be larger).
        label_fraction: share of train labels used (class-stratified, >= 1 per class).
        weight_decay: AdamW decoupled weight decay.
        seed: seeds the label subset, a new head's init and the shuffling.
        max_train_examples: optional cap on train examples (stratified too).
        augment: train on random views (``medformer.pretext.augment``: flips, mild zoom and shift,
            contrast jitter); on a few hundred labels it is the main guard against overfitting.
        validations: validate after this many evenly spaced epochs (always including the last)
            instead of after every epoch; long fine-tunes of tiny label subsets would otherwise
            spend most of their time on validation.
        progress: called after every epoch with ``{epoch, train_loss, val_auc, val_acc}``.

    Returns:
        ``auc``, ``acc`` (test, official), ``val_auc``, ``val_acc``, ``epochs``, ``best_epoch``,
        ``n_train``, ``seconds``.
    """
    t0 = time.perf_counter()
    _check_splits(splits, dataset)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    info = get_info(dataset)
    task = info.task
    train = splits["train"]
    train = train.subset(label_subset(train.labels, task, fraction=label_fraction,
                                      max_examples=max_train_examples, seed=seed))
    n = len(train)
    gen = torch.Generator().manual_seed(seed)

    net = copy.deepcopy(model)
    net.info(dataset)  # KeyError naming the model's datasets
    device = _device(net)
    if dataset not in net.outputs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = TaskHead(net.cfg, info.num_outputs)
            head.apply(init_weights)
        net.outputs[dataset] = head.to(device)

    # Only the parts on this dataset's path train; everything else stays frozen.
    prefixes = (f"inputs.{info.input_kind}.", f"latents.{dataset}.", "body.")
    head_prefix = f"outputs.{dataset}."
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        is_head = name.startswith(head_prefix)
        if not (is_head or name.startswith(prefixes)):
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        groups.setdefault((is_head, p.ndim >= 2), []).append(p)
    enc_lr = lr / 3 if encoder_lr is None else encoder_lr
    optim = torch.optim.AdamW(
        [{"params": ps, "lr": lr if is_head else enc_lr, "weight_decay": weight_decay if decay else 0.0}
         for (is_head, decay), ps in groups.items()],
        lr=lr, weight_decay=weight_decay,
    )
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=epochs * steps_per_epoch)

    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, best_val = 0, {"auc": math.nan, "acc": math.nan}
    validate_at = validation_epochs(epochs, validations)
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(n, generator=gen).numpy()
        total = 0.0
        for s in range(0, n, batch_size):
            x, y = train.batch(order[s : s + batch_size])  # [B, C, *S], [B, L]
            if augment:
                x = random_view(x, gen)
            loss = head_loss(net(x.to(device), dataset), y.to(device), task).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tune loss is {loss.item()} at epoch {epoch} on {dataset}; lower lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += loss.item() * x.shape[0]
        if epoch not in validate_at:
            continue
        net.eval()
        val = official_metrics(splits["val"].labels,
                               _predict_scores(net, splits["val"], dataset, task, batch_size=max(batch_size, 256)), task)
        stats = {"epoch": epoch, "train_loss": total / n, "val_auc": val["auc"], "val_acc": val["acc"]}
        log.info("fine-tune %s epoch %d/%d: loss %.4f val auc %.4f acc %.4f",
                 dataset, epoch, epochs, stats["train_loss"], val["auc"], val["acc"])
        if progress is not None:
            progress(stats)
        if best_key is None or _selection_key(val) > best_key:
            best_key, best_epoch, best_val = _selection_key(val), epoch, val
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    net.load_state_dict(best_state)
    net.eval()
    test = official_metrics(splits["test"].labels,
                            _predict_scores(net, splits["test"], dataset, task, batch_size=max(batch_size, 256)), task)
    result = {
        "auc": test["auc"], "acc": test["acc"], "val_auc": best_val["auc"], "val_acc": best_val["acc"],
        "epochs": epochs, "best_epoch": best_epoch, "n_train": n, "seconds": time.perf_counter() - t0,
    }
    log.info("fine-tune %s: test auc %.4f acc %.4f (best epoch %d/%d, n_train=%d, %.1fs)",
             dataset, result["auc"], result["acc"], best_epoch, epochs, n, result["seconds"])
    return result


def validation_epochs(epochs: int, validations: int | None) -> set[int]:
    """The epochs (1-based) after which ``fine_tune`` validates: evenly spaced, the last included."""
    if validations is None or validations >= epochs:
        return set(range(1, epochs + 1))
    if validations < 1:
        raise ValueError(f"validations must be >= 1, got {validations!r}")
    return {math.ceil(k * epochs / validations) for k in range(1, validations + 1)}


# --------------------------------------------------------------------------- conveniences


def random_init_reference(
    cfg: MedformerConfig,
    dataset_ref: DatasetRef,
    splits: Mapping[str, MedMNISTSplit],
    seed: int = 0,
    **kw: Any,
) -> dict[str, Any]:
    """Linear probe of an untrained Medformer (same config and dataset): the ``random_init`` baseline.

    Args:
        cfg: architecture of the model under evaluation.
        dataset_ref: flag or ``(flag, size)``; the size defaults to the splits' image size.
        splits: ``{"train", "val", "test"}`` splits of the dataset.
        seed: seeds the model init (global RNG untouched) and the probe.
        **kw: further :func:`linear_probe` arguments.
    """
    flag = dataset_ref if isinstance(dataset_ref, str) else dataset_ref[0]
    size = splits["train"].size if isinstance(dataset_ref, str) else int(dataset_ref[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Medformer(cfg, [(flag, size)], downstream_heads=False)
    return linear_probe(model, splits, flag, seed=seed, **kw)


def _accepted(fn: Callable[..., Any], kw: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def evaluate_encoder(
    model: Medformer,
    dataset: str,
    splits: Mapping[str, MedMNISTSplit],
    *,
    methods: Iterable[str] = ("linear_probe",),
    **kw: Any,
) -> dict[str, dict[str, Any]]:
    """Run several evaluation methods on one dataset: ``{method: metrics}``.

    Args:
        model: Medformer built for ``dataset`` (not modified).
        dataset: MedMNIST flag.
        splits: ``{"train", "val", "test"}`` splits of ``dataset``.
        methods: any of ``linear_probe``, ``fine_tune``, ``random_init`` (linear probe of an
            untrained model with the same config).
        **kw: options; each method receives those its function accepts (e.g. ``seed``,
            ``label_fraction`` to all, ``epochs`` to ``fine_tune`` only).
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown evaluation method(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    fns: dict[str, Callable[..., Any]] = {"linear_probe": linear_probe, "fine_tune": fine_tune,
                                          "random_init": linear_probe}
    used = {k for m in methods for k in _accepted(fns[m], kw)}
    stray = sorted(set(kw) - used)
    if stray:
        raise TypeError(f"option(s) {', '.join(stray)} not accepted by method(s) {', '.join(methods)}")
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        args = _accepted(fns[m], kw)
        if m == "random_init":
            seed = args.pop("seed", 0)
            out[m] = random_init_reference(model.cfg, (dataset, splits["train"].size), splits, seed, **args)
        else:
            out[m] = fns[m](model, splits, dataset, **args)
    return out
