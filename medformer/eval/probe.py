"""Linear evaluation of a frozen encoder (the protocol of SimCLR / MAE linear evaluation): standardised
features (``Medformer.probe_features``: every body block's pooled patch tokens), L2 logistic
regression with its strength chosen on the validation split; and the same probe on an untrained
Medformer (``random_init``)."""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from medformer.data import MedMNISTSplit, get_info
from medformer.eval.features import check_splits, extract_features
from medformer.eval.metrics import labelled_subsets, official_metrics, selection_key
from medformer.model import DatasetRef, Medformer, MedformerConfig, build_medformer

log = logging.getLogger(__name__)

# Decades of the inverse L2 strength. The former 0.01-10 grid was too narrow: validation chose one
# of its edges in 45 of the full benchmark's 75 probe rows (retina 0.01 in 14 of 15, breast 10 in
# every federated, local-only and centralized row), so the best C could lie beyond them.
DEFAULT_CS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: What the probe reads (``Medformer.probe_features``); benchmark rows hang on it and on ``DEFAULT_CS``, so a
#: new read-out or grid re-scores them.
PROBE_READOUT = "every body block's patch tokens, layer-normalised and mean-pooled, concatenated"

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

            predict.affine = _affine_multi_label(fits, x.shape[1])
            return predict
        yc = y[:, 0]
        classes = np.unique(yc)
        if classes.size == 1:  # degenerate: one class only

            def predict(z: np.ndarray) -> np.ndarray:
                out = np.zeros((len(z), n_classes))
                out[:, classes[0]] = 1.0
                return out

            predict.affine = _affine_softmax(None, classes, n_classes, x.shape[1])
            return predict
        clf = make().fit(x, yc)  # lbfgs: multinomial for > 2 classes (ordinal as multi-class)

        def predict(z: np.ndarray) -> np.ndarray:
            out = np.zeros((len(z), n_classes))
            out[:, clf.classes_] = clf.predict_proba(z)  # classes absent from train get 0
            return out

        predict.affine = _affine_softmax(clf, clf.classes_, n_classes, x.shape[1])
        return predict


_NEVER = 1.0e4  # a logit whose softmax / sigmoid share is exactly 0 (or 1) in float64


def _affine_softmax(clf, classes: np.ndarray, n_classes: int, dim: int) -> dict[str, np.ndarray]:
    """(weight [C, dim], bias [C]) whose softmax is the classifier's ``predict_proba`` (binary:
    softmax of [0, s] = [1 - sigmoid(s), sigmoid(s)]); classes absent from train get probability 0."""
    weight, bias = np.zeros((n_classes, dim)), np.full(n_classes, -_NEVER)
    if clf is None:  # one class only
        bias[classes[0]] = 0.0
    elif clf.coef_.shape[0] == 1:  # two classes: one logit, of classes[1]
        bias[classes] = (0.0, clf.intercept_[0])
        weight[classes[1]] = clf.coef_[0]
    else:
        weight[classes], bias[classes] = clf.coef_, clf.intercept_
    return {"weight": weight, "bias": bias, "activation": "softmax"}


def _affine_multi_label(fits: list, dim: int) -> dict[str, np.ndarray]:
    """(weight [L, dim], bias [L]) whose sigmoids are the per-label ``predict_proba``; a constant label
    gets the logit of its constant."""
    weight, bias = np.zeros((len(fits), dim)), np.zeros(len(fits))
    for j, f in enumerate(fits):
        if isinstance(f, float):
            bias[j] = _NEVER if f >= 0.5 else -_NEVER
        else:
            weight[j], bias[j] = f.coef_[0], f.intercept_[0]
    return {"weight": weight, "bias": bias, "activation": "sigmoid"}


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
    score_test: bool = True,
    return_probe: bool = False,
) -> dict[str, Any]:
    """Linear evaluation of the frozen encoder.

    Features (``Medformer.probe_features``) are standardised with train statistics; an L2 logistic
    regression (multinomial for multi-class and ordinal, one per label for multi-label) is fitted for
    each ``C`` in ``Cs`` and the one with the best validation AUC is scored on test.

    Args:
        model: Medformer built for ``dataset`` (not modified).
        splits: ``{"train", "val", "test"}`` splits of ``dataset``.
        dataset: MedMNIST flag.
        label_fraction: share of the labels used, train and validation alike (class-stratified, >= 1 per
            class; ``metrics.labelled_subsets``): C is chosen on the subsampled validation split.
        max_train_examples: optional cap on train examples (stratified too).
        seed: seed of the label subset; the fit itself is deterministic.
        Cs: inverse L2 strengths to try.
        batch_size: images per forward pass when extracting features.
        score_test: score the chosen C on test; False (choosing settings) leaves test unread and
            reports the validation metrics as ``auc``/``acc``.
        return_probe: also return the chosen probe as ``result["probe"]``: float64 ``mean`` and ``std``
            (the train statistics that standardise the features), ``weight`` [C, dim], ``bias`` [C] and
            ``activation`` (``softmax``, or ``sigmoid`` for multi-label), which reproduce its scores.

    Returns:
        ``auc``, ``acc`` (test, official), ``val_auc``, ``val_acc``, ``C``, ``n_train``, ``seconds``.
    """
    t0 = time.perf_counter()
    check_splits(splits, dataset)
    info = get_info(dataset)
    train, val_split = labelled_subsets(splits, info.task, fraction=label_fraction, max_examples=max_train_examples,
                                        seed=seed)
    parts = [("train", train), ("val", val_split)] + ([("test", splits["test"])] if score_test else [])
    feats = {name: extract_features(model, sp, dataset, batch_size=batch_size) for name, sp in parts}
    mean = feats["train"].mean(axis=0, dtype=np.float64)
    std = feats["train"].std(axis=0, dtype=np.float64) + 1e-6
    z = {k: (v - mean) / std for k, v in feats.items()}  # (N, dim) float64

    best: tuple[tuple[float, float], float, Callable[[np.ndarray], np.ndarray], dict[str, float]] | None = None
    # NOTE: one BLAS thread: on (N, 128) problems multi-threaded BLAS is 10-30x slower on 2 shared cores.
    with threadpool_limits(limits=1, user_api="blas"):
        for c in Cs:
            predict = _fit_logreg(z["train"], train.labels, info.task, info.n_classes, float(c))
            val = official_metrics(val_split.labels, predict(z["val"]), info.task)
            log.debug("linear probe %s C=%g: val auc %.4f acc %.4f", dataset, c, val["auc"], val["acc"])
            if best is None or selection_key(val) > best[0]:
                best = (selection_key(val), float(c), predict, val)
        if best is None:
            raise ValueError("Cs is empty; give at least one L2 strength")
        _, c_best, predict, val = best
        # Choosing settings (score_test=False) never touches test: the result's auc/acc are then val's.
        test = official_metrics(splits["test"].labels, predict(z["test"]), info.task) if score_test else val
    result = {
        "auc": test["auc"], "acc": test["acc"], "val_auc": val["auc"], "val_acc": val["acc"],
        "C": c_best, "n_train": len(train), "n_val": len(val_split), "seconds": time.perf_counter() - t0,
    }
    log.info("linear probe %s: %s auc %.4f acc %.4f (C=%g, n_train=%d, %.1fs)", dataset,
             "test" if score_test else "val", result["auc"], result["acc"], c_best, len(train), result["seconds"])
    if return_probe:
        result["probe"] = {"mean": mean, "std": std, **predict.affine}
    return result



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
        model = build_medformer(cfg, [(flag, size)], downstream_heads=False)
    return linear_probe(model, splits, flag, seed=seed, **kw)
