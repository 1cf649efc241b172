"""End-to-end fine-tuning of a copy of a Medformer with a downstream head: AdamW, optional linear
warm-up, cosine schedule, optional augmentation, optional weight averaging (EMA), model selection on the
validation split, test scored once."""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from medformer.data import AUGMENTATIONS, MedMNISTSplit, augment as augmented, get_info
from medformer.eval.features import check_splits, device_of, predict_scores
from medformer.eval.metrics import head_loss, labelled_subsets, official_metrics, selection_key
from medformer.model import Medformer

log = logging.getLogger(__name__)

# The fine-tune recipe chosen on the validation splits by the quality benchmark (the selection and
# its numbers: the comment above PRESETS in benchmarks/quality/experiment.py); `medfl finetune`'s
# defaults. At least ``min_epochs`` passes and ``min_steps`` optimizer steps, so small sites train
# as long as large ones.
RECIPE: dict[str, Any] = {"batch_size": 32, "lr": 1e-3, "encoder_lr": 3e-4, "warmup": 0.0, "ema": 0.99,
                          "head_first": 0.1, "min_epochs": 20, "min_steps": 1200}


def recipe_epochs(n_train: int, batch_size: int, *, min_epochs: int, min_steps: int) -> int:
    """Epochs that give at least ``min_epochs`` passes over ``n_train`` examples and ``min_steps`` steps."""
    return max(min_epochs, math.ceil(min_steps / math.ceil(n_train / batch_size)))


def fine_tune(
    model: Medformer,
    splits: Mapping[str, MedMNISTSplit],
    dataset: str,
    *,
    epochs: int = 5,
    min_steps: int = 0,
    lr: float = 1e-3,
    encoder_lr: float | None = None,
    batch_size: int = 128,
    label_fraction: float = 1.0,
    weight_decay: float = 0.05,
    warmup: float = 0.0,
    ema: float = 0.0,
    head_first: float = 0.0,
    seed: int = 0,
    max_train_examples: int | None = None,
    augment: bool | str = False,
    validations: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    score_test: bool = True,
    return_model: bool = False,
) -> dict[str, Any]:
    """End-to-end fine-tuning of a copy of ``model`` with the downstream head of ``dataset``.

    AdamW (no decay on 1-D parameters), a linear warm-up over the first ``warmup`` share of the
    steps, then cosine learning-rate decay per step to 0, validation after each
    epoch; the weights of the epoch with the best validation AUC are scored on test. A model
    without an ``outputs.<dataset>`` head gets a fresh one (seeded).

    Args:
        model: Medformer built for ``dataset``; never modified.
        splits: ``{"train", "val", "test"}`` splits of ``dataset``.
        dataset: MedMNIST flag.
        epochs: least passes over the (subsampled) train split.
        min_steps: least optimizer steps: more epochs than ``epochs`` when the (subsampled) train
            split is small, so small sites and label subsets train as long as large ones (``RECIPE``).
        lr: peak learning rate of the head.
        encoder_lr: peak learning rate of the encoder (inputs, latents, body); default ``lr / 3``.
        batch_size: training batch size (evaluation batches may be larger).
        label_fraction: share of the labels used, train and validation alike (class-stratified, >= 1 per
            class; ``metrics.labelled_subsets``): the epoch is chosen on the subsampled validation split.
        weight_decay: AdamW decoupled weight decay.
        warmup: share of the steps (in [0, 1)) over which the learning rates rise linearly to their peak
            (Adam's first steps on a transformer trained from scratch are otherwise the largest).
        ema: decay per optimizer step of an exponential moving average of the weights (0: none).
            When set, the averaged weights are the ones validated, chosen and scored: their
            validation curve is smoother, so the epoch chosen on a small validation split is less
            a matter of luck. The decay ramps up as ``min(ema, (1 + t) / (10 + t))`` after ``t``
            steps, so the average does not linger on the initial head.
        head_first: share of the steps (in [0, 1)) at the start during which only the head trains,
            the encoder frozen, as in LP-FT (Kumar et al., 2022): a random head's first gradients
            otherwise flow into the pretrained encoder and distort its features. The encoder then
            gets its own warm-up and cosine over the remaining steps; the head keeps one schedule.
        seed: seeds the label subset, a new head's init and the shuffling.
        max_train_examples: optional cap on train examples (stratified too).
        augment: training augmentation, a ``medformer.data.AUGMENTATIONS`` policy: ``"mirror"``
            (left-right flips, small shifts), ``"views"`` (``random_view``: flips on every axis, zoom,
            shift, contrast jitter) or ``"none"``; True means ``"views"``. On a few hundred labels it
            is the main guard against overfitting.
        validations: validate after this many evenly spaced epochs (always including the last)
            instead of after every epoch; long fine-tunes of tiny label subsets would otherwise
            spend most of their time on validation.
        progress: called after every validated epoch with ``{epoch, epochs, train_loss, val_auc,
            val_acc}`` (``epochs``: the total, ``min_steps`` included).
        score_test: score the chosen epoch on test; False (choosing settings) leaves test unread and
            reports the validation metrics as ``auc``/``acc``.
        return_model: also return the fine-tuned copy (the best epoch's weights, in eval mode) as
            ``result["model"]``.

    Returns:
        ``auc``, ``acc`` (test, official), ``val_auc``, ``val_acc``, ``epochs``, ``best_epoch``,
        ``n_train``, ``seconds``.
    """
    t0 = time.perf_counter()
    check_splits(splits, dataset)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a share of the steps in [0, 1), got {warmup!r}")
    if not 0.0 <= head_first < 1.0:
        raise ValueError(f"head_first must be a share of the steps in [0, 1), got {head_first!r}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be a decay in [0, 1), got {ema!r}")
    policy = ("views" if augment else "none") if isinstance(augment, bool) else augment
    if policy not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTATIONS)}")
    info = get_info(dataset)
    task = info.task
    train, val_split = labelled_subsets(splits, task, fraction=label_fraction, max_examples=max_train_examples,
                                        seed=seed)
    n = len(train)
    steps_per_epoch = math.ceil(n / batch_size)
    epochs = recipe_epochs(n, batch_size, min_epochs=epochs, min_steps=min_steps)
    gen = torch.Generator().manual_seed(seed)

    net = copy.deepcopy(model)
    net.info(dataset)  # KeyError naming the model's datasets
    device = device_of(net)
    # Only the parts on this dataset's path train (a new head if needed); everything else stays frozen.
    heads, encoder = net.fine_tune_parts(dataset, seed=seed)
    enc_lr = lr / 3 if encoder_lr is None else encoder_lr
    total_steps = epochs * steps_per_epoch
    frozen_steps = int(round(head_first * total_steps))  # the encoder's steps start after these
    head_factor, encoder_after = warmup_cosine(total_steps, warmup), warmup_cosine(total_steps - frozen_steps, warmup)

    def encoder_factor(step: int) -> float:
        return 0.0 if step < frozen_steps else encoder_after(step - frozen_steps)

    groups = [(heads, lr, head_factor), (encoder, enc_lr, encoder_factor)]
    param_groups = [({"params": [p for p in ps if (p.ndim >= 2) == decay], "lr": group_lr,
                      "weight_decay": weight_decay if decay else 0.0}, factor)
                    for ps, group_lr, factor in groups for decay in (True, False)
                    if any((p.ndim >= 2) == decay for p in ps)]
    optim = torch.optim.AdamW([g for g, _ in param_groups], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, [factor for _, factor in param_groups])
    averaged = WeightAverage(net, ema) if ema > 0 else None
    chosen = net if averaged is None else averaged.model  # the weights validated, chosen and scored

    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, best_val = 0, {"auc": math.nan, "acc": math.nan}
    validate_at = validation_epochs(epochs, validations)
    step = 0
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(n, generator=gen).numpy()
        total = 0.0
        for s in range(0, n, batch_size):
            x, y = train.batch(order[s : s + batch_size], device=device)  # [B, C, *S], [B, L]
            x = augmented(x, policy, gen)
            if step in (0, frozen_steps):  # frozen (no gradients, no Adam state) for the head-first steps
                for p in encoder:
                    p.requires_grad_(step >= frozen_steps)
            loss = head_loss(net(x, dataset), y, task).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tune loss is {loss.item()} at epoch {epoch} on {dataset}; lower lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            if averaged is not None:
                averaged.update(net)
            total += loss.item() * x.shape[0]
        if epoch not in validate_at:
            continue
        chosen.eval()
        scores = predict_scores(chosen, val_split, dataset, task, batch_size=max(batch_size, 256))
        val = official_metrics(val_split.labels, scores, task)
        stats = {"epoch": epoch, "epochs": epochs, "train_loss": total / n, "val_auc": val["auc"], "val_acc": val["acc"]}
        log.info("fine-tune %s epoch %d/%d: loss %.4f val auc %.4f acc %.4f",
                 dataset, epoch, epochs, stats["train_loss"], val["auc"], val["acc"])
        if progress is not None:
            progress(stats)
        if best_key is None or selection_key(val) > best_key:
            best_key, best_epoch, best_val = selection_key(val), epoch, val
            best_state = {k: v.detach().clone() for k, v in chosen.state_dict().items()}

    net = chosen
    net.load_state_dict(best_state)
    net.eval()
    # Choosing settings (score_test=False) never touches test: the result's auc/acc are then val's.
    test = best_val if not score_test else official_metrics(
        splits["test"].labels, predict_scores(net, splits["test"], dataset, task, batch_size=max(batch_size, 256)), task)
    result = {
        "auc": test["auc"], "acc": test["acc"], "val_auc": best_val["auc"], "val_acc": best_val["acc"],
        "epochs": epochs, "best_epoch": best_epoch, "n_train": n, "n_val": len(val_split),
        "seconds": time.perf_counter() - t0,
    }
    log.info("fine-tune %s: %s auc %.4f acc %.4f (best epoch %d/%d, n_train=%d, %.1fs)", dataset,
             "test" if score_test else "val", result["auc"], result["acc"], best_epoch, epochs, n, result["seconds"])
    if return_model:
        result["model"] = net
    return result


class WeightAverage:
    """An exponential moving average of a model's parameters, kept in a frozen copy of the model.

    The model has no running statistics (GroupNorm / LayerNorm, never BatchNorm), so averaging the
    parameters is the whole of it; buffers are copied as they are.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor after ``step`` optimizer steps: over the first W = ``warmup`` x
    ``total_steps`` steps it rises linearly (1/W, 2/W, ... 1), then a cosine takes it from 1 to 0."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    return factor


def validation_epochs(epochs: int, validations: int | None) -> set[int]:
    """The epochs (1-based) after which ``fine_tune`` validates: evenly spaced, the last included."""
    if validations is None or validations >= epochs:
        return set(range(1, epochs + 1))
    if validations < 1:
        raise ValueError(f"validations must be >= 1, got {validations!r}")
    return {math.ceil(k * epochs / validations) for k in range(1, validations + 1)}
