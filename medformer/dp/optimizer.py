"""DP-SGD's optimizer side (Opacus): noise, scaling and the step, around either per-sample clipper.

The clipper (``medformer.dp.clipping``) leaves each chunk's clipped per-sample gradient sum; the
Opacus DPOptimizer adds Gaussian noise drawn from a secret generator, divides by the expected batch
size (Poisson sampling) and steps.
"""
from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from medformer.dp.clipping import DP_CLIPPING, GhostClipper, HooksClipping


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


def forget_dp_state(model: torch.nn.Module) -> None:
    """Drop what Opacus leaves on the parameters (per-sample and summed gradients, counters)."""
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad", "_current_grad_sample", "_forward_counter"):
            if hasattr(p, attr):
                delattr(p, attr)


def empty_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """DP step on an empty Poisson batch: zero per-sample gradients, so the update is noise only."""
    # Clear the previous step's clipped sum first: left in place, Opacus would refuse the step
    # ("Gradients haven't been cleared") or, worse, release that batch's gradient a second time.
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)  # the clipped sum of no samples
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
