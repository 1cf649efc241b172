"""The membership-inference audit (medformer/audit.py): it sees memorisation where there is some (a model
overfit to a few images), sees none where there is none (candidates the model never saw), and sees less
under DP-SGD at a small epsilon."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medformer.dp.audit import attack_metrics, membership_audit, pretext_scores, tpr_at_fpr
from medformer.data import MedMNISTSplit
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.dp.accounting import PrivacyLedger, plan_dp
from medformer.train import TrainingSpec, train_local

FLAG = "breastmnist"
OBJ = PretextObjective({"mae": 1.0, "rotation": 0.5})


def _images(n: int, seed: int) -> MedMNISTSplit:
    """Random grey 28x28 images (uint8, the official layout): nothing to learn but the images themselves."""
    rng = np.random.default_rng(seed)
    return MedMNISTSplit(FLAG, "train", 28, rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8),
                         np.zeros((n, 1), np.int64))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model():
    torch.manual_seed(0)
    return build_pretext_model(make_config("tiny"), [FLAG], OBJ)


def _overfit(members: MedMNISTSplit, *, target_epsilon: float | None, steps: int = 100):
    model = _model()
    spec = TrainingSpec(batch_size=16, local_steps=steps, lr=3e-3, weight_decay=0.0)
    ledger = None
    if target_epsilon is not None:
        plan = plan_dp(num_examples=len(members), batch_size=16, steps_per_round=steps, rounds=1,
                       target_epsilon=target_epsilon)
        ledger = PrivacyLedger(plan)
    train_local(model, OBJ, members, FLAG, spec, generator=torch.Generator().manual_seed(1),
                secret_generator=torch.Generator().manual_seed(2), ledger=ledger)
    return model


def test_attack_metrics_on_known_scores():
    assert attack_metrics(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == (1.0, 1.0)
    assert attack_metrics(np.array([1.0, 2.0]), np.array([3.0, 4.0]))[0] == 0.0
    labels = np.r_[np.ones(100), np.zeros(100)]
    scores = np.r_[np.arange(100) + 50.5, np.arange(100)]  # 50 members above every non-member
    assert tpr_at_fpr(labels, scores, 0.01) == pytest.approx(0.5 + 0.01, abs=0.011)


def test_scores_are_deterministic_and_per_image():
    model, x = _model(), _images(12, 0).batch(np.arange(12))[0]
    a = pretext_scores(model, OBJ, x, FLAG, views=3, seed=5)
    b = pretext_scores(model, OBJ, x, FLAG, views=3, seed=5, batch_size=5)  # other batching, same masks
    np.testing.assert_allclose(a, b, rtol=1e-5)
    single = pretext_scores(model, OBJ, x[4:5], FLAG, views=3, seed=5)
    assert single[0] == pytest.approx(a[4], rel=1e-5)  # an image's score does not depend on its batch
    assert a.shape == (12,) and np.all(np.isfinite(a))


def test_attack_finds_an_overfit_model_and_less_under_dp():
    members, non_members, unseen = _images(32, 1), _images(200, 2), _images(200, 3)
    plain = _overfit(members, target_epsilon=None)
    leak = membership_audit(plain, OBJ, members=members, non_members=non_members, dataset=FLAG)
    assert leak.members == leak.non_members == 32
    assert leak.auc > 0.9 and leak.tpr_at_1pct_fpr > 0.3, leak
    assert leak.member_loss < leak.non_member_loss
    # Candidates the model never saw: the attack is at chance (k = 200 each: std of the AUC ~0.03).
    null = membership_audit(plain, OBJ, members=unseen, non_members=non_members, dataset=FLAG)
    assert abs(null.auc - 0.5) < 0.12, null
    # The same training under DP-SGD at epsilon 1: far less to find.
    private = _overfit(members, target_epsilon=1.0)
    dp = membership_audit(private, OBJ, members=members, non_members=non_members, dataset=FLAG)
    assert dp.auc < leak.auc - 0.25 and dp.auc < 0.75, (dp, leak)


def test_reference_calibration_and_equal_counts():
    members, non_members = _images(20, 4), _images(50, 5)
    model = _overfit(members, target_epsilon=None, steps=60)
    res = membership_audit(model, OBJ, members=members, non_members=non_members, dataset=FLAG, reference=_model())
    assert res.attack == "reference" and res.members == res.non_members == 20
    assert res.auc > 0.8 and res.loss_auc > 0.8
    capped = membership_audit(model, OBJ, members=members, non_members=non_members, dataset=FLAG, max_examples=8)
    assert capped.members == capped.non_members == 8
    with pytest.raises(ValueError, match="at least 2"):
        membership_audit(model, OBJ, members=members.subset(np.arange(1)), non_members=non_members, dataset=FLAG)


def test_members_and_non_members_are_matched_by_label():
    """Train and held-out splits hold the classes in other proportions; the audit must not measure that."""
    from medformer.dp.audit import _matched_indices

    rng = np.random.default_rng(0)
    members = MedMNISTSplit(FLAG, "train", 28, np.zeros((100, 1, 28, 28), np.uint8),
                            (np.arange(100) < 90).astype(np.int64).reshape(-1, 1))  # 90% class 1
    held_out = MedMNISTSplit(FLAG, "val", 28, np.zeros((60, 1, 28, 28), np.uint8),
                             (np.arange(60) % 2).astype(np.int64).reshape(-1, 1))  # 50% class 1
    im, in_ = _matched_indices(members, held_out, 60, rng)
    assert len(im) == len(in_) == 40  # 10 of class 0 (all the members have), 30 of class 1
    assert np.bincount(members.labels[im, 0]).tolist() == np.bincount(held_out.labels[in_, 0]).tolist() == [10, 30]
    assert len(set(im.tolist())) == len(im)
