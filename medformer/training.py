"""One hospital's local pretext training, plain or under DP-SGD.

The same loop serves both: without DP it shuffles and walks the data in batches; with DP it draws
Poisson-sampled batches (what the accountant assumes), clips each sample's gradient, noises the sum
and records every step in the hospital's PrivacyLedger. Per-sample clipping comes in two exact forms:
``ghost`` (default, medformer.dp_clipping: per-sample norms without per-sample gradients of the Linear
layers) and ``hooks`` (Opacus's GradSampleModule, every per-sample gradient materialised). A logical
batch larger than the physical batch is processed in chunks whose clipped gradients are summed before
the single noisy step (what Opacus's BatchMemoryManager does).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from medformer.data import MedMNISTSplit
from medformer.dp_clipping import GhostClipper
from medformer.model import Medformer
from medformer.pretext import PretextObjective
from medformer.privacy import PrivacyLedger, steps_for
from medformer.seeding import secret_generator as fresh_secret_generator

log = logging.getLogger(__name__)

DP_CLIPPING = ("ghost", "hooks")


@dataclass(frozen=True)
class LocalTrainSpec:
    """How a hospital trains in one round.

    Args:
        batch_size: (expected) batch size; with DP the Poisson rate is batch_size / n.
        local_epochs: passes over the local data per round (fractions allowed).
        local_steps: steps per round; overrides local_epochs when set.
        lr: learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: 'adamw' or 'sgd'.
        proximal_mu: FedProx coefficient mu of (mu/2)||w - w_global||^2 (0 = off).
        max_physical_batch: largest chunk pushed through the model at once.
        dp_clipping: how DP-SGD clips per-sample gradients: 'ghost' (per-sample norms from each
            Linear layer's inputs and output gradients, clipped sum in one matmul) or 'hooks'
            (Opacus materialises every per-sample gradient). Same clipped sums to float tolerance.
            On the default preset ghost costs 1.3-1.6x a plain step, hooks 1.6-3.4x (benchmarks/
            throughput.py, 2D MAE at batch 256 is where hooks is slowest).
        dp_physical_batch: the chunk size under DP-SGD with 'hooks'. Per-sample gradients of a whole
            batch of 256 cost ~600 MB and 6x a plain step on 2D inputs; chunks of 64 stay in cache
            (3.5x at batch 256 on 2D MAE). Results are identical. 'ghost' stores no more than plain
            training and uses max_physical_batch.
    """

    batch_size: int = 128
    local_epochs: float = 1.0
    local_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    proximal_mu: float = 0.0
    max_physical_batch: int = 512
    dp_clipping: str = "ghost"
    dp_physical_batch: int = 64

    def __post_init__(self) -> None:
        if self.dp_clipping not in DP_CLIPPING:
            raise ValueError(f"unknown dp_clipping {self.dp_clipping!r}; choose from {', '.join(DP_CLIPPING)}")

    def steps(self, num_examples: int) -> int:
        return steps_for(num_examples, self.batch_size, self.local_epochs, self.local_steps)

    def physical_batch(self, dp: bool) -> int:
        """Largest chunk of a logical batch pushed through the model at once."""
        if dp and self.dp_clipping == "hooks":
            return min(self.max_physical_batch, self.dp_physical_batch)
        return self.max_physical_batch


@dataclass
class LocalTrainResult:
    num_examples: int
    steps: int
    seconds: float
    images_per_second: float
    loss: float
    task_losses: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None


def make_optimizer(params, spec: LocalTrainSpec) -> torch.optim.Optimizer:
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
    spec: LocalTrainSpec,
    *,
    generator: torch.Generator,
    secret_generator: torch.Generator | None = None,
    optimizer_state: Mapping | None = None,
    ledger: PrivacyLedger | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[LocalTrainResult, dict]:
    """Train ``model`` in place on ``data`` for one round.

    Args:
        model: the hospital's Medformer (only its own keys), already loaded with global weights.
        objective: pretext tasks and weights.
        data: the hospital's training split (or partition of it).
        dataset: the MedMNIST flag of ``data``.
        spec: optimisation settings.
        generator: the hospital's seeded RNG: shuffling, masks, rotations, augmentations (reproducible).
        secret_generator: under DP-SGD, the source of the Poisson batches and the Gaussian noise.
            None (what a site always uses) = a fresh one seeded from ``os.urandom``
            (``medformer.seeding``): nobody else can replay the noise. Tests pass a seeded one.
        optimizer_state: the optimizer's state from the previous round, if kept.
        ledger: DP-SGD accountant; when given, trains with DP-SGD at its plan's noise and clip.
        on_step: called with (step, loss) after each step (progress display).

    Returns:
        The round's result and the optimizer's state dict.
    """
    with flush_denormals():
        return _train_local(model, objective, data, dataset, spec, generator=generator,
                            secret_generator=secret_generator, optimizer_state=optimizer_state, ledger=ledger,
                            on_step=on_step)


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


def _train_local(model, objective, data, dataset, spec, *, generator, secret_generator, optimizer_state, ledger,
                 on_step):
    n = len(data)
    if n == 0:
        raise ValueError(f"hospital data for {dataset} is empty")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, spec)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    anchor = [p.detach().clone() for p in params] if spec.proximal_mu > 0 else None
    steps = spec.steps(n)
    model.train()

    clipper = None
    if ledger is not None:
        if not objective.per_sample:
            raise ValueError(
                f"pretext task(s) {', '.join(objective.non_per_sample_tasks())} are not sums of per-sample "
                "losses; DP-SGD cannot protect them"
            )
        plan = ledger.plan
        secret = secret_generator if secret_generator is not None else fresh_secret_generator()
        optimizer, clipper = make_dp_sgd(
            model, optimizer, clipping=spec.dp_clipping, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, expected_batch_size=max(1, round(plan.sample_rate * n)),
            generator=secret,
        )

        def after_noise(opt: DPOptimizer) -> None:
            ledger.record_step()
            if anchor is not None:
                _add_proximal_grad(params, anchor, spec.proximal_mu)

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
                _empty_step(optimizer, params)
            for c, chunk in enumerate(chunks):
                x, _ = data.batch(chunk)
                w = len(chunk) / len(idx)
                last = c == len(chunks) - 1
                # DP: each chunk's clipped sum is computed afresh (the DPOptimizer keeps the running
                # sum across skipped steps). Plain: gradients accumulate, chunk-weighted.
                if dp or c == 0:
                    optimizer.zero_grad(set_to_none=True)
                loss, parts = chunk_backward(objective, model, x, dataset, generator, clipper, weight=w)
                if dp:
                    optimizer.signal_skip_step(do_skip=not last)
                elif anchor is not None:
                    _add_proximal_grad(params, anchor, spec.proximal_mu)
                if dp or last:
                    optimizer.step()
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
            _forget_dp_state(model)
    seconds = time.perf_counter() - start
    result = LocalTrainResult(
        num_examples=n, steps=steps, seconds=seconds, images_per_second=seen / max(seconds, 1e-9),
        loss=loss_sum / max(seen, 1), task_losses={k: v / max(seen, 1) for k, v in task_sums.items()},
        epsilon=ledger.epsilon() if ledger is not None else None,
    )
    state = (optimizer.original_optimizer if isinstance(optimizer, DPOptimizer) else optimizer).state_dict()
    return result, state


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


def _empty_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """DP step on an empty Poisson batch: zero per-sample gradients, so the update is noise only."""
    # Clear the previous step's clipped sum first: left in place, Opacus would refuse the step
    # ("Gradients haven't been cleared") or, worse, release that batch's gradient a second time.
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)  # the clipped sum of no samples
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    optimizer.step()


# --------------------------------------------------------------------------------------------------
# DP-SGD: per-sample clipping + the Opacus optimizer that noises, scales and steps
# --------------------------------------------------------------------------------------------------
class HooksClipping:
    """Opacus's GradSampleModule: hooks materialise per-sample gradients; the DPOptimizer clips them.

    Same interface as :class:`~medformer.dp_clipping.GhostClipper` (``recording``, ``backward``, ``close``).
    """

    def __init__(self, model: torch.nn.Module):
        self.gsm = GradSampleModule(model, loss_reduction="mean")

    def recording(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def close(self) -> None:
        self.gsm._close()


def make_dp_sgd(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, clipping: str, noise_multiplier: float,
    max_grad_norm: float, expected_batch_size: int, generator: torch.Generator,
) -> tuple[DPOptimizer, GhostClipper | HooksClipping]:
    """DP-SGD around ``optimizer``: the clipper of the chosen kind and the DPOptimizer that sums the
    chunks' clipped gradients, adds N(0, (noise_multiplier * max_grad_norm)^2) noise to the sum and
    divides by ``expected_batch_size`` (Poisson sampling), then steps.

    ``generator`` draws the noise: a secret one (``medformer.seeding.secret_generator``) for any
    release. Opacus's ``secure_mode`` draws each noise value as the scaled sum of four Gaussians,
    which defeats the floating-point attacks on a single Gaussian sample (Holohan & Braghin 2021).
    """
    common = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, generator=generator, secure_mode=True)
    if clipping == "ghost":
        # Gets p.grad = the chunk's clipped sum from the clipper; noises and scales like DPOptimizer.
        return DPOptimizerFastGradientClipping(optimizer, **common), GhostClipper(model, max_grad_norm)
    if clipping == "hooks":
        return DPOptimizer(optimizer, **common), HooksClipping(model)
    raise ValueError(f"unknown dp_clipping {clipping!r}; choose from {', '.join(DP_CLIPPING)}")


def _forget_dp_state(model: torch.nn.Module) -> None:
    """Drop what Opacus leaves on the parameters (per-sample and summed gradients, counters)."""
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad", "_current_grad_sample", "_forward_counter"):
            if hasattr(p, attr):
                delattr(p, attr)
