"""Empirical privacy audit: a membership-inference attack on a pretrained Medformer (pure torch).

The attacker holds the released model (with its pretext heads) and a pool of candidate images, and
guesses which were in a hospital's training data. Members are the hospital's training images,
non-members held-out images of the same dataset drawn from the same distribution, in equal numbers
and with the same label mix. Use MedMNIST's validation split (carved from the same source as the
training split), not its test split, which may come from elsewhere: PneumoniaMNIST's test images are
systematically easier for the pretext tasks, and a quickstart model "leaked" with AUC 0.40 against
them (0.49 against validation images) - the attack measured the split shift, not membership.

Attack (loss threshold, Yeom et al. 2018, "Privacy Risk in Machine Learning"): a model fits its
training images better, so a low pretext loss means "member". Each image's score is its pretext
loss averaged over fixed views, so the randomness of the task does not drown the signal: the same
``views`` MAE masks for every image, and every rotation class. Calibrated attack (Watson et al. 2022,
"On the Importance of Difficulty Calibration in Membership Inference Attacks"; Carlini et al. 2022,
LiRA, offline variant): an image that is easy for any model has a low loss anyway, so the score is
the *difference* between a reference model's loss and the target's; the reference must not have seen
the candidates (trained on other data, or the untrained initial model).

We report the attack's ROC AUC (0.5 = no better than guessing) and its TPR at 1% FPR, which says
whether a few members can be identified confidently (Carlini et al. 2022). The attack is a lower
bound on leakage, not a proof of privacy: DP's epsilon bounds every attack, this one measures one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from medformer.data import MedMNISTSplit
from medformer.model import Medformer
from medformer.pretext import PretextObjective
from medformer.seeding import derived_seed


@dataclass(frozen=True)
class AuditResult:
    """Outcome of a membership-inference attack.

    Attributes:
        auc: ROC AUC of the reported attack (calibrated when a reference was given, else loss).
        tpr_at_1pct_fpr: true-positive rate at a false-positive rate of at most 1%.
        loss_auc: AUC of the plain loss-threshold attack (same scores, no calibration).
        attack: ``"loss"`` or ``"reference"`` (calibrated by a reference model's loss).
        members: member images scored; non_members: as many held-out images.
        member_loss: mean pretext loss of the members under the target model.
        non_member_loss: the same for non-members (their gap is the generalisation gap).
    """

    auc: float
    tpr_at_1pct_fpr: float
    loss_auc: float
    attack: str
    members: int
    non_members: int
    member_loss: float
    non_member_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def pretext_scores(model: Medformer, objective: PretextObjective, images: torch.Tensor, dataset: str, *,
                   views: int = 8, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Each image's weighted pretext loss, averaged over fixed views: [N, C, *S] -> [N].

    Args:
        model: a Medformer carrying the objective's pretext heads.
        objective: the tasks and weights the model was trained with.
        images: float images in [-1, 1].
        dataset: the MedMNIST flag of ``images``.
        views: fixed random views per stochastic task (``PretextTask.fixed_view_losses``: the same MAE
            masks for every image, every rotation class, seeded augmentations for two-view tasks).
        seed: fixes the views.
        batch_size: images per forward pass.
    """
    model.eval()
    n = images.shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    for name, task in objective.tasks.items():
        acc = torch.zeros(n, dtype=torch.float64)
        count = 0
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size]
            terms = task.fixed_view_losses(model, x, dataset, views=views, seed=seed)
            count = len(terms)
            for t in terms:
                acc[start : start + len(x)] += t.double()
        total += objective.weights[name] * acc / max(count, 1)
    return total.numpy()


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    """Highest true-positive rate among thresholds whose false-positive rate is at most ``fpr``."""
    f, t, _ = roc_curve(labels, scores)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def attack_metrics(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[float, float]:
    """(AUC, TPR at 1% FPR) of scores where higher means "member"."""
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    return float(roc_auc_score(labels, scores)), tpr_at_fpr(labels, scores, 0.01)


def _class_ids(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One id per example of two label arrays: its label, or its label set for multi-label rows."""
    rows = np.concatenate([np.asarray(a).reshape(len(a), -1), np.asarray(b).reshape(len(b), -1)])
    ids = np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)
    return ids[: len(a)], ids[len(a) :]


def _matched_indices(members: MedMNISTSplit | torch.Tensor, non_members: MedMNISTSplit | torch.Tensor, k: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Equal numbers of members and non-members, with the same label mix when labels are known.

    A train and a test split rarely hold the classes in the same proportions (PneumoniaMNIST: 74% vs
    62% pneumonia), and classes differ in how hard their images are; unmatched, the attack would
    measure the class mix instead of membership.
    """
    nm, nn = len(members), len(non_members)
    if isinstance(members, torch.Tensor) or isinstance(non_members, torch.Tensor):
        return (np.sort(rng.choice(nm, size=k, replace=False)), np.sort(rng.choice(nn, size=k, replace=False)))
    cm, cn = _class_ids(members.labels, non_members.labels)
    classes = sorted(set(cm.tolist()) & set(cn.tolist()))
    avail = np.array([min((cm == c).sum(), (cn == c).sum()) for c in classes], dtype=float)
    take = np.floor(avail * min(1.0, k / avail.sum())).astype(int) if avail.sum() else avail.astype(int)
    im = [rng.choice(np.flatnonzero(cm == c), size=t, replace=False) for c, t in zip(classes, take)]
    in_ = [rng.choice(np.flatnonzero(cn == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(im or [np.zeros(0, int)])), np.sort(np.concatenate(in_ or [np.zeros(0, int)]))


def _images(split: MedMNISTSplit | torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return split[torch.as_tensor(idx)] if isinstance(split, torch.Tensor) else split.batch(idx)[0]


def membership_audit(model: Medformer, objective: PretextObjective, *, members: MedMNISTSplit | torch.Tensor,
                     non_members: MedMNISTSplit | torch.Tensor, dataset: str, reference: Medformer | None = None,
                     max_examples: int = 500, views: int = 8, seed: int = 0) -> AuditResult:
    """Attack ``model``: tell ``members`` from ``non_members`` by their pretext loss.

    Args:
        model: the released model (with pretext heads for ``dataset``).
        objective: the pretext tasks and weights it was trained with.
        members: the hospital's training images (a split, or float images in [-1, 1]).
        non_members: held-out images of the same dataset and distribution (its validation split).
        dataset: the MedMNIST flag.
        reference: a model that saw none of the candidates (trained on other data, or the initial
            model); when given, the score is ``loss_reference - loss_model`` (difficulty calibrated).
        max_examples: members scored at most; the same number of non-members (equal counts, and the same
            label mix when both are splits).
        views: fixed MAE masks / augmentations averaged per image.
        seed: fixes which candidates are drawn and the views.

    Returns:
        The attack's AUC and TPR at 1% FPR (plus the uncalibrated loss attack's AUC).
    """
    k = min(len(members), len(non_members), int(max_examples))
    rng = np.random.default_rng(derived_seed(seed, "audit", dataset) % 2**32)
    im, in_ = _matched_indices(members, non_members, k, rng)
    if len(im) < 2:
        raise ValueError(f"need at least 2 members and 2 non-members of the same classes, got {len(members)} "
                         f"members and {len(non_members)} non-members ({len(im)} matched)")
    xm, xn = _images(members, im), _images(non_members, in_)
    with torch.random.fork_rng():  # scoring draws no global randomness, but keep the caller's state anyway
        lm = pretext_scores(model, objective, xm, dataset, views=views, seed=seed)
        ln = pretext_scores(model, objective, xn, dataset, views=views, seed=seed)
        loss_auc, loss_tpr = attack_metrics(-lm, -ln)
        if reference is None:
            auc, tpr, attack = loss_auc, loss_tpr, "loss"
        else:
            rm = pretext_scores(reference, objective, xm, dataset, views=views, seed=seed)
            rn = pretext_scores(reference, objective, xn, dataset, views=views, seed=seed)
            auc, tpr = attack_metrics(rm - lm, rn - ln)
            attack = "reference"
    return AuditResult(auc=auc, tpr_at_1pct_fpr=tpr, loss_auc=loss_auc, attack=attack, members=len(im),
                       non_members=len(in_),
                       member_loss=float(np.mean(lm)), non_member_loss=float(np.mean(ln)))

