"""Tests for medformer.eval: losses, official metrics, linear probe, fine-tuning."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC

from medformer.data import MedMNISTSplit, get_info, load_splits
from medformer.eval import (
    DEFAULT_CS,
    METHODS,
    extract_features,
    fine_tune,
    head_loss,
    head_scores,
    label_subset,
    linear_probe,
    official_metrics,
    random_init_reference,
    validation_epochs,
)
from medformer.model import Medformer, build_medformer, make_config
from synthetic import write_synthetic_npz

# One flag per MedMNIST task type.
FLAGS = {
    "binary-class": "breastmnist",
    "multi-class": "bloodmnist",
    "multi-label, binary-class": "chestmnist",
    "ordinal-regression": "retinamnist",
}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("synth")
    write_synthetic_npz(folder, "breastmnist", n_train=128, n_val=48, n_test=48, seed=1)
    for flag in ("bloodmnist", "chestmnist", "retinamnist"):
        write_synthetic_npz(folder, flag, n_train=96, n_val=48, n_test=48, seed=2)
    return folder


def _splits(folder, flag: str):
    return load_splits(flag, data_dir=folder, verify=False)


def _model(flag: str, seed: int = 0, *, heads: bool = True) -> Medformer:
    torch.manual_seed(seed)
    return build_medformer(make_config("tiny"), [flag], downstream_heads=heads)


def _labels(task: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if task.startswith("multi-label"):
        y = (rng.random((n, k)) < 0.4).astype(np.int64)
        y[0], y[1] = 1, 0  # both values for every label
        return y
    return (np.arange(n) % k).reshape(n, 1).astype(np.int64)


# --------------------------------------------------------------------------- losses and scores


@pytest.mark.parametrize("task", list(FLAGS))
def test_head_loss_per_sample_finite_and_differentiable(task: str) -> None:
    info = get_info(FLAGS[task])
    rng = np.random.default_rng(0)
    logits = torch.randn(6, info.num_outputs, requires_grad=True)
    labels = torch.from_numpy(_labels(task, 6, info.n_classes, rng))
    loss = head_loss(logits, labels, task)
    assert loss.shape == (6,)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_head_loss_ordinal_is_cumulative_bce() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.1]])  # 4 thresholds, 5 grades
    loss = head_loss(logits, torch.tensor([[2]]), "ordinal-regression")
    p = torch.sigmoid(logits[0])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])  # y=2 > k for k = 0, 1
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).sum()
    torch.testing.assert_close(loss[0], expected)


def test_head_loss_rejects_wrong_task_and_shapes() -> None:
    with pytest.raises(ValueError, match="unknown MedMNIST task"):
        head_loss(torch.zeros(2, 2), torch.zeros(2, 1, dtype=torch.long), "regression")
    with pytest.raises(ValueError, match="multi-label"):
        head_loss(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), "multi-label, binary-class")


@pytest.mark.parametrize("task", list(FLAGS))
def test_head_scores_format_matches_official_evaluator(task: str) -> None:
    info = get_info(FLAGS[task])
    rng = np.random.default_rng(1)
    n = 40
    scores = head_scores(torch.randn(n, info.num_outputs) * 3, task)
    assert scores.shape == (n, info.n_classes)
    assert scores.dtype == np.float64
    assert np.all((scores >= 0) & (scores <= 1))
    if not task.startswith("multi-label"):
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-9)
    y = _labels(task, n, info.n_classes, rng)
    m = official_metrics(y, scores, task)  # the official functions accept the format
    assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["acc"] <= 1.0


def test_head_scores_ordinal_from_cumulative_probabilities() -> None:
    big = 30.0
    # Confident "y > 0, y > 1, not y > 2, not y > 3" -> grade 2.
    scores = head_scores(torch.tensor([[big, big, -big, -big]]), "ordinal-regression")
    np.testing.assert_allclose(scores[0], [0, 0, 1, 0, 0], atol=1e-9)
    # Inconsistent cumulative probabilities (P(y>1) > P(y>0)) are clipped at 0 and renormalised.
    scores = head_scores(torch.tensor([[0.0, 2.0]]), "ordinal-regression")
    p0, p1 = torch.sigmoid(torch.tensor([0.0, 2.0], dtype=torch.float64)).tolist()
    raw = np.array([1 - p0, 0.0, p1])
    np.testing.assert_allclose(scores[0], raw / raw.sum())


def test_head_scores_binary_and_multilabel_values() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    np.testing.assert_allclose(head_scores(logits, "binary-class"), torch.softmax(logits.double(), 1).numpy())
    np.testing.assert_allclose(head_scores(logits, "multi-label, binary-class"),
                               torch.sigmoid(logits.double()).numpy())


# --------------------------------------------------------------------------- official metrics


def test_official_metrics_equal_medmnist_functions() -> None:
    rng = np.random.default_rng(3)
    cases = {
        "binary-class": (np.array([[0], [1], [1], [0], [1], [0]]), rng.dirichlet([1, 1], 6)),
        "multi-class": (np.array([[0], [1], [2], [2], [1], [0]]), rng.dirichlet([1, 1, 1], 6)),
        "ordinal-regression": (np.array([[0], [1], [2], [2], [1], [0]]), rng.dirichlet([1, 1, 1], 6)),
        "multi-label, binary-class": (np.array([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0], [0, 1]]),
                                      rng.random((6, 2))),
    }
    for task, (y, s) in cases.items():
        got = official_metrics(y, s, task)
        assert got == {"auc": float(getAUC(y, s, task)), "acc": float(getACC(y, s, task))}, task
        assert isinstance(got["auc"], float) and isinstance(got["acc"], float)


def test_official_metrics_perfect_scores_and_hand_values() -> None:
    y = np.array([[0], [0], [1], [1]])
    s = np.array([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    assert official_metrics(y, s, "binary-class") == {"auc": 1.0, "acc": 1.0}
    # Separable ranking, but threshold 0.5 misclassifies the second positive: ACC 3/4.
    s2 = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
    assert official_metrics(y, s2, "binary-class") == {"auc": 1.0, "acc": 0.75}
    y3 = np.array([[0], [1], [2]])
    assert official_metrics(y3, np.eye(3), "multi-class") == {"auc": 1.0, "acc": 1.0}
    with pytest.raises(ValueError, match="rows"):
        official_metrics(y, s[:3], "binary-class")


# --------------------------------------------------------------------------- label subsets


@pytest.mark.parametrize("task", ["multi-class", "binary-class"])
def test_label_subset_stratified_keeps_every_class(task: str) -> None:
    y = np.array([0] * 90 + [1] * 8 + [2] * 2).reshape(-1, 1) if task == "multi-class" else \
        np.array([0] * 95 + [1] * 5).reshape(-1, 1)
    idx = label_subset(y, task, fraction=0.1, seed=0)
    assert len(idx) == 10
    assert set(np.unique(y[idx])) == set(np.unique(y))
    assert np.array_equal(idx, label_subset(y, task, fraction=0.1, seed=0))  # deterministic
    assert not np.array_equal(idx, label_subset(y, task, fraction=0.1, seed=1))
    capped = label_subset(y, task, max_examples=4, seed=0)
    assert len(capped) == 4 and set(np.unique(y[capped])) == set(np.unique(y))
    assert np.array_equal(label_subset(y, task), np.arange(100))


def test_label_subset_multilabel_has_both_values_per_label() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 5)) < 0.05).astype(np.int64)
    y[7, 4] = 1  # make sure a rare label exists
    idx = label_subset(y, "multi-label, binary-class", fraction=0.02, seed=0)
    assert len(idx) < 20
    for j in range(5):
        assert set(np.unique(y[idx, j])) == set(np.unique(y[:, j]))


def test_label_subset_rejects_bad_arguments() -> None:
    y = np.zeros((10, 1), np.int64)
    with pytest.raises(ValueError, match="label_fraction"):
        label_subset(y, "binary-class", fraction=0.0)
    with pytest.raises(ValueError, match="max_train_examples"):
        label_subset(y, "binary-class", max_examples=0)


# --------------------------------------------------------------------------- features and probe


def test_extract_features_shape_and_mode_restored(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist")
    model.train()
    feats = extract_features(model, sp["val"], "breastmnist", batch_size=7)  # several batches
    assert feats.shape == (48, model.probe_dim) and feats.dtype == np.float32
    assert model.training
    with torch.no_grad():
        ref = model.eval().probe_features(sp["val"].batch(slice(0, 5))[0], "breastmnist").numpy()
    np.testing.assert_allclose(feats[:5], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("site_norms", [False, True])
def test_probe_features_are_every_block_pooled_the_last_as_embed(site_norms) -> None:
    torch.manual_seed(0)
    cfg = make_config("tiny", depth=3, site_norms=site_norms)
    model = build_medformer(cfg, ["breastmnist"], downstream_heads=False).eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        feats = model.probe_features(x, "breastmnist")
        hidden: list[torch.Tensor] = []
        model.body(model.latents["breastmnist"](model.patch_tokens(x, "breastmnist")), "breastmnist", hidden=hidden)
        first = torch.nn.functional.layer_norm(hidden[0], (cfg.dim,))[:, cfg.num_latents:].mean(1)
        embed = model.embed(x, "breastmnist")
    assert feats.shape == (4, model.probe_dim) == (4, 3 * cfg.dim) and len(hidden) == 3
    torch.testing.assert_close(feats[:, -cfg.dim:], embed)  # the last block through the body's own norm
    torch.testing.assert_close(feats[:, :cfg.dim], first)
    assert not torch.allclose(feats[:, cfg.dim:2 * cfg.dim], feats[:, :cfg.dim])  # each block its own part


def test_linear_probe_learns_binary_signal_and_is_deterministic(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = linear_probe(model, sp, "breastmnist")
    assert res["auc"] > 0.8
    assert 0.0 <= res["acc"] <= 1.0 and res["val_auc"] > 0.8
    assert res["C"] in DEFAULT_CS
    assert res["n_train"] == 128
    again = linear_probe(model, sp, "breastmnist")
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("task", ["multi-class", "multi-label, binary-class", "ordinal-regression"])
def test_linear_probe_every_task_type(synth_dir, task: str) -> None:
    flag = FLAGS[task]
    sp = _splits(synth_dir, flag)
    res = linear_probe(_model(flag, heads=False), sp, flag, Cs=(0.1,))
    assert 0.0 <= res["auc"] <= 1.0 and 0.0 <= res["acc"] <= 1.0
    assert res["auc"] > 0.6  # the synthetic blobs are learnable


def test_linear_probe_label_fraction_reduces_train_and_keeps_classes(synth_dir) -> None:
    sp = _splits(synth_dir, "bloodmnist")  # 8 classes, 12 examples each
    res = linear_probe(_model("bloodmnist"), sp, "bloodmnist", label_fraction=0.1, Cs=(1.0,))
    assert res["n_train"] == 10  # round(0.1 * 96), at least one per class
    idx = label_subset(sp["train"].labels, "multi-class", fraction=0.1, seed=0)
    assert len(idx) == res["n_train"]
    assert set(np.unique(sp["train"].labels[idx])) == set(range(8))
    capped = linear_probe(_model("bloodmnist"), sp, "bloodmnist", max_train_examples=16, Cs=(1.0,))
    assert capped["n_train"] == 16


def test_label_fraction_subsamples_validation_in_the_same_proportion(synth_dir) -> None:
    """1% or 10% of the labels means that share of the validation labels too: C and the epoch are
    chosen on them, never on the full validation split."""
    sp = _splits(synth_dir, "bloodmnist")
    n_val = len(sp["val"])
    probe = linear_probe(_model("bloodmnist"), sp, "bloodmnist", label_fraction=0.25, Cs=(1.0,))
    assert probe["n_val"] == len(label_subset(sp["val"].labels, "multi-class", fraction=0.25)) < n_val
    ft = fine_tune(_model("bloodmnist"), sp, "bloodmnist", epochs=1, batch_size=16, label_fraction=0.25)
    assert ft["n_val"] == probe["n_val"]
    assert linear_probe(_model("bloodmnist"), sp, "bloodmnist", Cs=(1.0,))["n_val"] == n_val


class _SealedTest:
    """A test split that fails the moment anything but its name is read."""

    def __init__(self, flag: str):
        self.flag = flag

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name}) while choosing settings")


def test_choosing_settings_never_reads_the_test_split(synth_dir) -> None:
    sp = dict(_splits(synth_dir, "breastmnist"))
    sp["test"] = _SealedTest("breastmnist")
    probe = linear_probe(_model("breastmnist"), sp, "breastmnist", Cs=(0.1, 1.0), score_test=False)
    assert probe["auc"] == probe["val_auc"] and probe["acc"] == probe["val_acc"]
    ft = fine_tune(_model("breastmnist"), sp, "breastmnist", epochs=2, batch_size=16, score_test=False)
    assert ft["auc"] == ft["val_auc"]


def test_linear_probe_rejects_wrong_splits(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    with pytest.raises(ValueError, match="breastmnist"):
        linear_probe(_model("breastmnist"), sp, "bloodmnist")
    with pytest.raises(ValueError, match="test"):
        linear_probe(_model("breastmnist"), {"train": sp["train"], "val": sp["val"]}, "breastmnist")


# --------------------------------------------------------------------------- fine-tuning


def test_fine_tune_improves_and_leaves_model_untouched(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[dict] = []
    res = fine_tune(model, sp, "breastmnist", epochs=6, batch_size=16, seed=0, progress=seen.append)
    assert res["auc"] > 0.75  # chance is 0.5
    assert res["epochs"] == 6 and 1 <= res["best_epoch"] <= 6 and res["n_train"] == 128
    assert [s["epoch"] for s in seen] == list(range(1, 7))
    assert res["val_auc"] == max(s["val_auc"] for s in seen)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_fine_tune_deterministic_with_label_fraction_and_new_head(synth_dir) -> None:
    sp = _splits(synth_dir, "retinamnist")
    model = _model("retinamnist", heads=False)
    kw = dict(epochs=2, batch_size=16, label_fraction=0.5, seed=3)
    a = fine_tune(model, sp, "retinamnist", **kw)
    b = fine_tune(model, sp, "retinamnist", **kw)
    assert a["n_train"] == 48
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert "retinamnist" not in model.outputs  # the new head lives only in the copy


def test_fine_tune_with_augmentation_and_sparse_validation(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist")
    seen: list[dict] = []
    kw = dict(epochs=7, batch_size=16, seed=0, augment=True, validations=3)
    res = fine_tune(model, sp, "breastmnist", **kw, progress=seen.append)
    assert [s["epoch"] for s in seen] == [3, 5, 7]  # evenly spaced, the last included
    assert res["best_epoch"] in (3, 5, 7) and res["auc"] > 0.7
    plain = fine_tune(model, sp, "breastmnist", epochs=7, batch_size=16, seed=0, validations=3)
    assert plain["auc"] != res["auc"] or plain["val_auc"] != res["val_auc"]  # the views changed the training
    again = fine_tune(model, sp, "breastmnist", **kw)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}


def test_fine_tune_min_steps_sizes_epochs_from_the_labels_it_draws(synth_dir) -> None:
    sp = _splits(synth_dir, "retinamnist")
    model = _model("retinamnist", heads=False)
    seen: list[dict] = []
    # 96 train images at batch 16: 6 steps an epoch, so 20 steps need 4 epochs; half the labels
    # (48 images, 3 steps an epoch) need 7. Fewer steps than ``epochs`` give change nothing.
    full = fine_tune(model, sp, "retinamnist", epochs=2, min_steps=20, batch_size=16, progress=seen.append)
    half = fine_tune(model, sp, "retinamnist", epochs=2, min_steps=20, batch_size=16, label_fraction=0.5)
    short = fine_tune(model, sp, "retinamnist", epochs=2, min_steps=3, batch_size=16)
    assert (full["n_train"], full["epochs"]) == (96, 4) and (half["n_train"], half["epochs"]) == (48, 7)
    assert short["epochs"] == 2
    assert [(s["epoch"], s["epochs"]) for s in seen] == [(e, 4) for e in range(1, 5)]


@pytest.mark.parametrize("epochs,validations,expected", [
    (5, None, {1, 2, 3, 4, 5}), (5, 9, {1, 2, 3, 4, 5}), (10, 2, {5, 10}), (7, 1, {7}), (100, 4, {25, 50, 75, 100}),
])
def test_validation_epochs(epochs: int, validations: int | None, expected: set[int]) -> None:
    assert validation_epochs(epochs, validations) == expected


def test_warmup_cosine_rises_linearly_then_follows_the_cosine_to_zero() -> None:
    from medformer.eval.finetune import warmup_cosine

    plain = warmup_cosine(100, 0.0)
    assert [plain(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    warm = warmup_cosine(100, 0.1)  # 10 warm-up steps, then a cosine over the other 90
    assert [warm(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert [warm(s) for s in (10, 55, 100)] == pytest.approx([1.0, 0.5, 0.0])


def test_fine_tune_warmup_changes_the_training_and_is_checked(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist")
    kw = dict(epochs=3, batch_size=16, seed=0)
    plain, warm = (fine_tune(model, sp, "breastmnist", **kw, warmup=w) for w in (0.0, 0.3))
    assert plain["val_auc"] != warm["val_auc"] or plain["auc"] != warm["auc"]
    with pytest.raises(ValueError, match="warmup must be a share of the steps in \\[0, 1\\), got 1.0"):
        fine_tune(model, sp, "breastmnist", **kw, warmup=1.0)


def test_validation_epochs_rejects_zero() -> None:
    with pytest.raises(ValueError, match="validations"):
        validation_epochs(5, 0)


# --------------------------------------------------------------------------- conveniences


# --------------------------------------------------------------------------- several methods at once
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


def test_evaluate_encoder_and_random_init(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist", seed=5)
    out = evaluate_encoder(model, "breastmnist", sp, methods=("linear_probe", "random_init", "fine_tune"),
                           seed=1, epochs=1, Cs=(1.0,), max_train_examples=32)
    assert set(out) == {"linear_probe", "random_init", "fine_tune"}
    assert out["fine_tune"]["epochs"] == 1
    assert all(r["n_train"] == 32 for r in out.values())
    ref = random_init_reference(model.cfg, "breastmnist", sp, 1, Cs=(1.0,), max_train_examples=32)
    assert {k: v for k, v in ref.items() if k != "seconds"} == \
        {k: v for k, v in out["random_init"].items() if k != "seconds"}
    s0 = torch.random.get_rng_state()
    random_init_reference(model.cfg, ("breastmnist", 28), sp, 1, Cs=(1.0,), max_train_examples=32)
    assert torch.equal(torch.random.get_rng_state(), s0)  # global RNG untouched
    with pytest.raises(ValueError, match="unknown evaluation method"):
        evaluate_encoder(model, "breastmnist", sp, methods=("knn",))
    with pytest.raises(TypeError, match="epochs"):
        evaluate_encoder(model, "breastmnist", sp, methods=("linear_probe",), epochs=3)


# --------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_linear_probe_random_tiny_model_on_real_breastmnist(real_data_dir) -> None:
    sp = load_splits("breastmnist", data_dir=real_data_dir)
    res = linear_probe(_model("breastmnist", heads=False), sp, "breastmnist")
    assert res["n_train"] == get_info("breastmnist").n_samples["train"]
    for key in ("auc", "acc", "val_auc"):
        assert 0.0 <= res[key] <= 1.0, (key, res)


def test_a_probe_fitted_on_another_read_out_is_refused_by_name(synth_dir) -> None:
    from medformer.data import DataError
    from medformer.eval.probe_head import LinearProbe
    from medformer.predict import score_split
    from medformer.pretrained import attach_probe

    sp = _splits(synth_dir, "breastmnist")
    torch.manual_seed(0)
    model = build_medformer(make_config("tiny", depth=2), ["breastmnist"], downstream_heads=False)
    attach_probe(model, "breastmnist", LinearProbe(model.cfg.dim, 2))  # the width of the last block alone
    with pytest.raises(DataError, match=r"breastmnist linear probe reads 32 features .* have 64; refit"):
        score_split(model, sp["test"], "breastmnist")
    attach_probe(model, "breastmnist", LinearProbe(model.probe_dim, 2))
    assert score_split(model, sp["test"], "breastmnist").shape == (len(sp["test"]), 2)


def test_weight_average_is_an_exponential_moving_average_with_a_ramped_decay() -> None:
    from medformer.eval.finetune import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.GroupNorm(1, 2))
    frozen = net[1].weight.detach().clone()
    avg = WeightAverage(net, 0.9)
    expected = net[0].weight.detach().clone()
    for t in range(1, 40):
        with torch.no_grad():
            net[0].weight.add_(torch.randn_like(net[0].weight))
        avg.update(net)
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * net[0].weight.detach()
    assert torch.allclose(avg.model[0].weight, expected, atol=1e-6)
    assert torch.equal(avg.model[1].weight, frozen)  # a parameter that never moves stays exact
    assert not any(p.requires_grad for p in avg.model.parameters())


def test_fine_tune_ema_chooses_the_averaged_weights_and_is_checked(synth_dir) -> None:
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist")
    kw = dict(epochs=3, batch_size=16, seed=0, score_test=False, return_model=True)
    plain, averaged = (fine_tune(model, sp, "breastmnist", **kw, ema=e) for e in (0.0, 0.9))
    # The same training, seen through other weights: the returned (chosen) weights differ.
    assert any(not torch.equal(a, b) for a, b in zip(plain["model"].state_dict().values(),
                                                      averaged["model"].state_dict().values()))
    with pytest.raises(ValueError, match="ema must be a decay in \\[0, 1\\), got 1.0"):
        fine_tune(model, sp, "breastmnist", **kw, ema=1.0)


def test_fine_tune_head_first_trains_the_head_alone_then_the_encoder(synth_dir) -> None:
    """LP-FT: over the first ``head_first`` share of the steps the encoder gets no step at all."""
    sp = _splits(synth_dir, "breastmnist")
    model = _model("breastmnist", heads=False)
    encoder = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(epochs=2, batch_size=16, seed=0, score_test=False, return_model=True, validations=1)

    def moved(result) -> bool:
        tuned = result["model"].state_dict()
        return any(not torch.equal(tuned[k], v) for k, v in encoder.items())

    head_only = fine_tune(model, sp, "breastmnist", head_first=0.99, **kw)  # 16 steps, all frozen
    assert not moved(head_only) and "breastmnist" in head_only["model"].outputs
    assert moved(fine_tune(model, sp, "breastmnist", head_first=0.5, **kw))
    with pytest.raises(ValueError, match="head_first must be a share of the steps in \\[0, 1\\), got 1.0"):
        fine_tune(model, sp, "breastmnist", head_first=1.0, **kw)
