"""One hospital's local pretext training, plain or under DP-SGD.

The same loop serves both: without DP it shuffles and walks the data in batches; with DP it draws
Poisson-sampled batches (what the accountant assumes) from a secret generator, clips each sample's
gradient (``medformer.dp.clipping``: ghost clipping by default, or Opacus's hooks), noises the sum
(``medformer.dp.optimizer``) and records every step in the hospital's PrivacyLedger. A logical batch
larger than the physical batch is processed in chunks whose gradients are summed before the single
step (what Opacus's BatchMemoryManager does).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from medformer.data import MedMNISTSplit
from medformer.device import device_of
from medformer.dp.accounting import PrivacyLedger
from medformer.dp.clipping import DP_CLIPPING, GhostClipper, HooksClipping
from medformer.dp.optimizer import empty_step, forget_dp_state, make_dp_sgd
from medformer.model import Medformer
from medformer.pretext import PretextObjective
from medformer.seeding import secret_generator as fresh_secret_generator
from medformer.settings import setting

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """How every hospital trains: the scenario's ``training`` section, the round instructions' training
    settings and ``train_local``'s argument are this one dataclass.

    Args:
        rounds: federated rounds (DP-SGD's noise is calibrated for all of them).
        local_epochs: passes over the local train split per round (fractions allowed).
        local_steps: optimizer steps per round; when set it replaces ``local_epochs``.
        batch_size: examples per local step (the expected batch size under DP-SGD's Poisson sampling,
            whose rate is batch_size / n).
        lr: local learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: ``adamw`` or ``sgd``.
        keep_optimizer_state: keep each hospital's optimizer state across rounds.
        max_physical_batch: largest chunk of a batch pushed through the model at once.
        dp_clipping: how DP-SGD clips per-sample gradients: ``ghost`` (per-sample norms from each
            Linear layer's inputs and output gradients, clipped sum in one matmul) or ``hooks`` (Opacus
            materialises every per-sample gradient). Same clipped sums to float tolerance; on the
            default preset ghost costs 1.3-1.6x a plain step, hooks 1.6-3.4x (benchmarks/throughput.py).
        dp_physical_batch: the chunk size under DP-SGD with ``hooks`` (per-sample gradients of a whole
            batch of 256 cost ~600 MB on 2D inputs; chunks of 64 stay in cache). ``ghost`` stores no
            more than plain training and uses ``max_physical_batch``.
    """

    rounds: int = setting(3, ge=1, le=10_000)
    local_epochs: float = setting(1.0, gt=0, le=1_000)
    local_steps: int | None = setting(None, ge=1, le=10_000_000)
    batch_size: int = setting(128, ge=1, le=65_536)
    lr: float = setting(1.0e-3, gt=0, le=10)
    weight_decay: float = setting(0.05, ge=0, le=10)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    keep_optimizer_state: bool = False
    max_physical_batch: int = setting(512, ge=1, le=65_536)
    dp_clipping: str = setting("ghost", choices=lambda: DP_CLIPPING)
    dp_physical_batch: int = setting(64, ge=1, le=65_536)

    def __post_init__(self) -> None:
        if self.dp_clipping not in DP_CLIPPING:
            raise ValueError(f"unknown dp_clipping {self.dp_clipping!r}; choose from {', '.join(DP_CLIPPING)}")

    def steps(self, num_examples: int) -> int:
        """Local steps one round takes: ``local_steps`` if set, else epochs x ceil-batches per epoch."""
        if self.local_steps is not None:
            return int(self.local_steps)
        return max(1, math.ceil(self.local_epochs * num_examples / self.batch_size))

    def physical_batch(self, dp: bool) -> int:
        """Largest chunk of a logical batch pushed through the model at once."""
        if dp and self.dp_clipping == "hooks":
            return min(self.max_physical_batch, self.dp_physical_batch)
        return self.max_physical_batch


@dataclass
class TrainResult:
    """What one round of local training did (losses are means over the round's images)."""

    num_examples: int
    steps: int
    seconds: float
    images_per_second: float
    loss: float
    task_losses: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None


def make_optimizer(params, spec: TrainingSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose from adamw, sgd")


def _shuffled_batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """``steps`` batches of indices, reshuffling at each pass over the data."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, n):
            order += torch.randperm(n, generator=gen).tolist()
        yield np.asarray(order[:batch_size]), None
        del order[:batch_size]


def _poisson_batches(n: int, rate: float, steps: int, gen: torch.Generator):
    """``steps`` Poisson-sampled batches: each record independently with probability ``rate``."""
    for _ in range(steps):
        yield (torch.rand(n, generator=gen) < rate).nonzero(as_tuple=True)[0].numpy(), None


def _add_proximal_grad(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], mu: float) -> None:
    """FedProx: add mu (w - w_global) to each gradient (the data-free prox term's gradient)."""
    for p, a in zip(params, anchor):
        if p.grad is not None:
            p.grad.add_(p.detach() - a, alpha=mu)


def train_local(
    model: Medformer,
    objective: PretextObjective,
    data: MedMNISTSplit,
    dataset: str,
    spec: TrainingSpec,
    *,
    generator: torch.Generator,
    secret_generator: torch.Generator | None = None,
    proximal_mu: float = 0.0,
    optimizer_state: Mapping | None = None,
    ledger: PrivacyLedger | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[TrainResult, dict]:
    """Train ``model`` in place on ``data`` for one round.

    Args:
        model: the hospital's Medformer (only its own keys), already loaded with global weights; it
            trains on the device it is on (batches follow it).
        objective: pretext tasks and weights.
        data: the hospital's training split (or partition of it).
        dataset: the MedMNIST flag of ``data``.
        spec: optimisation settings.
        proximal_mu: FedProx coefficient mu of (mu/2)||w - w_global||^2 (0 = off); its gradient is
            added once per logical batch (after the noise under DP-SGD: it is data-free).
        generator: the hospital's seeded RNG: shuffling, masks, rotations, augmentations (reproducible).
        secret_generator: under DP-SGD, the source of the Poisson batches and the Gaussian noise
            (a CPU generator). None (what a site always uses) = a fresh one seeded from ``os.urandom``
            (``medformer.seeding``): nobody else can replay the noise. Tests pass a seeded one. On a
            GPU the noise comes from a generator on the model's device (fresh from ``os.urandom``, or
            seeded from the given one); the Poisson batches stay on this CPU generator.
        optimizer_state: the optimizer's state from the previous round, if kept.
        ledger: DP-SGD accountant; when given, trains with DP-SGD at its plan's noise and clip.
        on_step: called with (step, loss) after each step (progress display).

    Returns:
        The round's result and the optimizer's state dict.
    """
    with flush_denormals():
        return _train_local(model, objective, data, dataset, spec, generator=generator,
                            secret_generator=secret_generator, proximal_mu=proximal_mu,
                            optimizer_state=optimizer_state, ledger=ledger, on_step=on_step)


def train_pooled(model: Medformer, objective: PretextObjective, data: Mapping[str, MedMNISTSplit],
                 steps: Mapping[str, int], spec: TrainingSpec, *, generators: Mapping[str, torch.Generator]
                 ) -> dict[str, float]:
    """Centralized pretraining: one model and optimizer over several datasets' pooled training data.

    Dataset d's ``steps[d]`` batches are interleaved in proportion (its i-th batch sits at
    (i + 0.5) / steps[d] of the run), each drawn as train_local walks its data (reshuffled every
    pass) from ``generators[d]``, which also draws that dataset's masks and rotations. Plain
    training only: this is the pooled-data baseline no federation can run (data never leaves a site).

    Returns:
        Each dataset's mean pretext loss.
    """
    model.train()
    objective.begin_round(model)
    device = device_of(model)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], spec)
    schedule = sorted(((i + 0.5) / n, j, d) for j, (d, n) in enumerate(steps.items()) for i in range(n))
    batches = {d: _shuffled_batches(len(data[d]), spec.batch_size, steps[d], generators[d]) for d in steps}
    sums = {d: [0.0, 0] for d in steps}
    with flush_denormals():
        for _, _, d in schedule:
            idx, _ = next(batches[d])
            x, _ = data[d].batch(idx, device=device)
            loss, _ = objective(model, x, d, generators[d])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"centralized pretext loss became {loss.item()} on {d}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            objective.after_step(model)
            sums[d][0] += loss.item()
            sums[d][1] += 1
    return {d: s / max(n, 1) for d, (s, n) in sums.items()}


def _denormals_flushed() -> bool:
    return float(torch.tensor([1e-39]) * torch.tensor([1.0])) == 0.0


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero inside the block, then restore the previous mode.

    Real scans are mostly exact background; their gradients underflow to denormals, which run ~4x
    slower on x86 CPUs. Flushing them changes no result we can measure. The mode is per process
    (it also changes numpy's arithmetic), so it is put back as it was.
    """
    before = _denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _train_local(model, objective, data, dataset, spec, *, generator, secret_generator, proximal_mu,
                 optimizer_state, ledger, on_step):
    n = len(data)
    if n == 0:
        raise ValueError(f"hospital data for {dataset} is empty")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, spec)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    steps = spec.steps(n)
    device = device_of(model)
    model.train()
    objective.begin_round(model)  # before DP hooks are attached: a teacher copy must not carry them

    clipper = None
    if ledger is not None:
        if objective.dp_objection():
            raise ValueError(objective.dp_objection())
        plan = ledger.plan
        secret = secret_generator if secret_generator is not None else fresh_secret_generator()
        optimizer, clipper = make_dp_sgd(
            model, optimizer, clipping=spec.dp_clipping, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, expected_batch_size=max(1, round(plan.sample_rate * n)),
            generator=noise_generator(secret, device, seeded=secret_generator is not None),
        )

        def after_noise(opt: DPOptimizer) -> None:
            ledger.record_step()
            if anchor is not None:
                _add_proximal_grad(params, anchor, proximal_mu)

        optimizer.attach_step_hook(after_noise)
        batches = _poisson_batches(n, plan.sample_rate, steps, secret)  # secret: membership of a batch is private
    else:
        batches = _shuffled_batches(n, spec.batch_size, steps, generator)

    dp = clipper is not None
    physical = spec.physical_batch(dp)
    start = time.perf_counter()
    seen, loss_sum, task_sums = 0, 0.0, {k: 0.0 for k in objective.tasks}
    try:
        for step, (idx, _) in enumerate(batches):
            chunks = [idx[i : i + physical] for i in range(0, len(idx), physical)]
            step_loss = 0.0
            if not chunks:  # an empty Poisson batch still takes a (pure-noise) step
                empty_step(optimizer, params)
            for c, chunk in enumerate(chunks):
                x, _ = data.batch(chunk, device=device)
                w = len(chunk) / len(idx)
                last = c == len(chunks) - 1
                # DP: each chunk's clipped sum is computed afresh (the DPOptimizer keeps the running
                # sum across skipped steps). Plain: gradients accumulate, chunk-weighted.
                if dp or c == 0:
                    optimizer.zero_grad(set_to_none=True)
                loss, parts = chunk_backward(objective, model, x, dataset, generator, clipper, weight=w)
                if dp:
                    optimizer.signal_skip_step(do_skip=not last)
                elif last and anchor is not None:  # once per logical batch, not once per chunk
                    _add_proximal_grad(params, anchor, proximal_mu)
                if dp or last:
                    optimizer.step()
                if last:
                    objective.after_step(model)
                step_loss += loss.item() * w
                for k, v in parts.items():
                    task_sums[k] += v * len(chunk)
            if not np.isfinite(step_loss):
                raise FloatingPointError(f"pretext loss became {step_loss} at local step {step} on {dataset}")
            seen += len(idx)
            loss_sum += step_loss * len(idx)
            if on_step is not None:
                on_step(step, step_loss)
    finally:
        if clipper is not None:
            clipper.close()  # remove hooks: the model is reused plain (evaluation, next round)
            forget_dp_state(model)
    seconds = time.perf_counter() - start
    result = TrainResult(
        num_examples=n, steps=steps, seconds=seconds, images_per_second=seen / max(seconds, 1e-9),
        loss=loss_sum / max(seen, 1), task_losses={k: v / max(seen, 1) for k, v in task_sums.items()},
        epsilon=ledger.epsilon() if ledger is not None else None,
    )
    state = (optimizer.original_optimizer if isinstance(optimizer, DPOptimizer) else optimizer).state_dict()
    return result, state


def noise_generator(secret: torch.Generator, device: torch.device, *, seeded: bool) -> torch.Generator:
    """DP-SGD's noise generator on the model's ``device`` (Opacus draws the noise where the gradients are).

    On the CPU it is ``secret`` itself. Elsewhere a generator on that device: fresh from ``os.urandom``,
    or, when the caller passed a seeded ``secret`` (tests), seeded from it, so a seeded run stays
    reproducible. The Poisson batches are drawn from ``secret`` on the CPU either way.
    """
    if device.type == "cpu":
        return secret
    if not seeded:
        return fresh_secret_generator(device)
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=secret)))


def chunk_backward(objective: PretextObjective, model: Medformer, x: torch.Tensor, dataset: str,
                   generator: torch.Generator, clipper: GhostClipper | HooksClipping | None, *,
                   weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward and backward of one chunk of a batch; returns the objective's (loss, task losses).

    Under DP-SGD (``clipper`` given) the gradients left for the DP optimizer are the chunk's clipped
    per-sample sums; without, ``weight`` x the mean loss is backpropagated (chunks accumulate).
    """
    if clipper is None:
        loss, parts = objective(model, x, dataset, generator)
        (loss * weight).backward()
        return loss, parts
    with clipper.recording():
        loss, parts = objective(model, x, dataset, generator)
    clipper.backward(loss)
    return loss, parts


