"""DP-SGD's per-sample clipping: ghost clipping (no per-sample gradients of the Linear layers) and
Opacus's hooks.

DP-SGD needs each sample's gradient norm over all parameters jointly, then the sum of the sample
gradients each scaled by c_i = min(1, C / (norm_i + 1e-6)). Opacus's hooks materialise every
per-sample gradient ([B, *shape] per parameter); on the Medformer, whose 2D MAE encoder sees 6 tokens,
writing and reading those tensors is most of a DP-SGD step.

A Linear layer used with inputs a_i [T, din] and output gradients g_i [T, dout] (all its uses in the
forward pass concatenated along T) has the per-sample weight gradient g_i^T a_i, so

* its squared norm is sum_{t,s} (a_t . a_s)(g_t . g_s) (Li et al. 2021): two small Gram matrices when
  T is small (when T is large, the per-sample gradients are formed instead, see _form_per_sample);
* the clipped sum is (c * g)^T a over the flattened batch (Bu et al. 2022, "book-keeping"): one matmul,
  the cost of the plain weight gradient.

A conv whose kernel tiles its input (kernel = stride, no padding: the patch tokenizers) is the same
Linear layer applied to the patches. Other convs (the conv stems' 3x3 stages) form their per-sample
weight gradients as one grouped convolution over the batch (:func:`_conv_per_sample`) where their
output has many positions, since Opacus's unfold copies each sample's input 3^d times; one with few
output positions is a Linear layer applied to its unfolded patches (:func:`_unfold_wins`). The other
layers (LayerNorm, raw parameters such as positions and tokens) are small: their per-sample gradients
come from Opacus's grad samplers, or its functorch fallback. Autograd computes no parameter gradient
at all: every parameter is frozen while the forward pass is recorded, so the backward pass carries
only the activations' gradients the clipper reads.

The result equals Opacus's GradSampleModule + DPOptimizer clipping to float tolerance; use it with
``DPOptimizerFastGradientClipping``, which noises and scales the clipped sum left in ``p.grad``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn

from medformer.layers import MaskedGroupNorm

Grads = dict[nn.Parameter, torch.Tensor]

#: The two exact per-sample clipping methods: ``ghost`` (:class:`GhostClipper`, the default) and
#: ``hooks`` (:class:`HooksClipping`, Opacus's GradSampleModule).
DP_CLIPPING: tuple[str, ...] = ("ghost", "hooks")


@dataclass
class _Use:
    """One call of a layer in the recorded forward pass: its inputs, later its output's gradient."""

    inputs: list[torch.Tensor]
    grad: torch.Tensor | None = None


@dataclass
class _Contribution:
    """A layer's per-sample squared gradient norms [B] and a way to its clipped gradient sums."""

    sq_norms: torch.Tensor
    clipped_sums: Callable[[torch.Tensor], Grads] = field(repr=False)  # factors [B] -> {param: weighted sum}


class GhostClipper:
    """Per-sample clipped gradient sums of ``model``'s trainable parameters.

    Usage, per (physical) batch::

        with clipper.recording():
            loss = mean of per-sample losses
        clipper.backward(loss)   # p.grad = sum over samples of clipped per-sample gradients

    Args:
        model: the model; every module that owns trainable parameters gets a hook (``close`` removes it).
        max_grad_norm: the clipping bound C on each sample's gradient norm over all parameters.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float):
        GradSampleModule.validate(model, strict=True)  # no buffers (BatchNorm mixes samples), as Opacus
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._trainable = set(self.params)
        layers = [m for m in model.modules() if _own_trainable(m)]
        for m in layers:
            nested = any(_own_trainable(c) for c in m.modules() if c is not m)
            if nested and type(m) not in GradSampleModule.GRAD_SAMPLERS:
                # Opacus's functorch fallback differentiates the whole module: children counted twice.
                raise ValueError(f"{type(m).__name__} owns parameters and has children that do too; "
                                 "ghost clipping needs a grad sampler for it")
        self._uses: dict[nn.Module, list[_Use]] = {}
        self._recording = False
        self._handles = [m.register_forward_hook(self._record) for m in layers]

    @contextmanager
    def recording(self):
        """Forward passes inside record each layer's inputs and hook its output's gradient.

        The parameters are frozen meanwhile: autograd then skips every (unclipped) parameter gradient,
        which ``backward`` forms clipped from what was recorded.
        """
        self._uses.clear()
        self._recording = True
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            self._recording = False
            for p in self.params:
                p.requires_grad_(True)

    def _record(self, module: nn.Module, inputs, output) -> None:
        if not (self._recording and module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"ghost clipping needs layers that return one tensor; {type(module).__name__} does not")
        if not output.requires_grad:
            # Nothing upstream carries the graph (an image into the tokenizer): start it here, so
            # that this output's gradient is computed.
            output.requires_grad_(True)
        use = _Use([t.detach() for t in inputs if isinstance(t, torch.Tensor)])
        self._uses.setdefault(module, []).append(use)
        output.register_hook(lambda g: setattr(use, "grad", g.detach()))

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backpropagate the batch-mean ``loss`` and leave in each ``p.grad`` the sum over samples of
        the per-sample gradients, each clipped to ``max_grad_norm`` jointly over all parameters.

        Returns the per-sample gradient norms before clipping [B].
        """
        loss.backward()
        uses = {m: [u for u in us if u.grad is not None] for m, us in self._uses.items()}
        self._uses.clear()
        uses = {m: us for m, us in uses.items() if us}  # uses that reach no loss contribute nothing
        if not uses:
            raise ValueError("no trainable layer received a gradient: was the forward pass run inside recording()?")
        batch = _batch_size(uses)
        parts = [_contribution(m, us, batch, self._trainable) for m, us in uses.items()]
        # The loss is a batch mean: each per-sample gradient is batch x its share of the backward pass.
        sq = sum((part.sq_norms for part in parts), torch.zeros(batch, dtype=loss.dtype, device=loss.device))
        norms = sq.sqrt() * batch
        clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # DPOptimizer's formula
        summed: Grads = {}
        for part in parts:
            for p, g in part.clipped_sums(clip * batch).items():
                summed[p] = summed[p] + g if p in summed else g
        for p in self.params:
            p.grad = summed[p].view_as(p) if p in summed else torch.zeros_like(p)
        return norms

    def close(self) -> None:
        """Remove the hooks and give every parameter its requires_grad back."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recording = False
        for p in self.params:
            p.requires_grad_(True)


def _own_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _batch_size(uses: dict[nn.Module, list[_Use]]) -> int:
    sizes = {u.grad.shape[0] for us in uses.values() for u in us}
    if len(sizes) != 1:
        raise ValueError(f"layers saw different batch sizes {sorted(sizes)}; per-sample clipping needs one batch")
    return sizes.pop()


def _contribution(layer: nn.Module, uses: list[_Use], batch: int, trainable: set) -> _Contribution:
    """A layer's squared norms and clipped sums, for per-sample gradients scaled by 1 / batch."""
    views = [_as_matmul(layer, u, batch) for u in uses]
    if all(v is not None for v in views):
        return _ghost(layer, views, batch, trainable)
    sampler = _conv_per_sample if all(_grouped_conv_wins(layer, u) for u in uses) else None
    return _materialised(layer, uses, batch, trainable, sampler)


def _as_matmul(layer: nn.Module, use: _Use, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs [B, T, din], output gradients [B, T, dout]) of a layer that multiplies each token by
    its weight [dout, din]: a Linear layer, a conv whose kernel tiles its input, or a conv with few
    output positions (its unfolded patches); None otherwise."""
    if isinstance(layer, nn.Linear):
        return (use.inputs[0].reshape(batch, -1, layer.in_features),
                use.grad.reshape(batch, -1, layer.out_features))
    if _zero_padded_conv(layer) and (_tiles(layer) or _unfold_wins(layer, use)):
        return _unfolded_patches(layer, use.inputs[0]), use.grad.flatten(2).mT
    return None


def _zero_padded_conv(layer: nn.Module) -> bool:
    """A conv padded with explicit zeros (or not at all): what every per-sample conv route here computes."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.padding_mode == "zeros" \
        and layer.padding != "same"


def _tiles(conv: nn.Module) -> bool:
    """Whether a conv's kernel tiles its input (kernel = stride, no padding, dilation or groups: the
    patch tokenizers). Its unfolded patches are then a reshaped copy of the input, never worth Opacus's
    route."""
    return (conv.stride == conv.kernel_size and conv.groups == 1 and all(d == 1 for d in conv.dilation)
            and conv.padding in ("valid", (0,) * len(conv.kernel_size)))


def _unfolded_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches [B, T, C * prod(kernel)] a zero-padded conv without groups reads (im2col), in the
    order of its flattened weight and of its flattened output (any input size: the windows a conv
    drops at the border are dropped here too). Opacus unfolds the same patches, then forms each
    sample's [dout, din] weight gradient; as a matmul layer's tokens the ghost norm can skip that
    (:func:`_tiles`, :func:`_unfold_wins`)."""
    nd = x.dim() - 2
    if conv.padding != "valid":
        x = F.pad(x, [p for p in reversed(conv.padding) for _ in range(2)])
    for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # windows appended as trailing dims
    b, c, *grid = x.shape[: 2 + nd]
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(order).reshape(b, math.prod(grid), c * math.prod(conv.kernel_size))


def _ghost(layer: nn.Module, views: list[tuple[torch.Tensor, torch.Tensor]], batch: int,
           trainable: set) -> _Contribution:
    """Ghost norm and book-keeping sum of a matmul layer over all its uses.

    The uses stay apart: concatenating their tokens copied every activation and gradient once more
    (15-45% of each body layer's clipping time on the default preset, masked reconstruction + rotation,
    batch 256, 1 thread)."""
    tokens = sum(a.shape[1] for a, _ in views)
    din, dout = views[0][0].shape[2], views[0][1].shape[2]
    has_weight = layer.weight in trainable
    has_bias = layer.bias is not None and layer.bias in trainable
    sq = torch.zeros(batch, dtype=views[0][1].dtype, device=views[0][1].device)
    per_sample = None  # [B, dout, din] when formed: its clipped sum is then a matvec, not a matmul
    if has_weight:
        if _form_per_sample(batch, tokens, din, dout):
            a, g = views[0]
            per_sample = torch.bmm(g.mT, a)
            for a, g in views[1:]:
                per_sample.baddbmm_(g.mT, a)
            sq = _sq_norms(per_sample)
        else:
            sq = _gram_sq_norms(views)
    bias_per_sample = sum(g.sum(1) for _, g in views) if has_bias else None  # [B, dout]
    if has_bias:
        sq = sq + _sq_norms(bias_per_sample)

    def clipped_sums(factor: torch.Tensor) -> Grads:
        out = {}
        if per_sample is not None:
            out[layer.weight] = factor @ per_sample.reshape(batch, -1)  # a matvec: faster than einsum
        elif has_weight:
            weight = None
            for a, g in views:
                scaled = (g * factor[:, None, None]).reshape(-1, dout).T
                weight = scaled @ a.reshape(-1, din) if weight is None else weight.addmm_(scaled, a.reshape(-1, din))
            out[layer.weight] = weight
        if has_bias:
            out[layer.bias] = factor @ bias_per_sample
        return out

    return _Contribution(sq, clipped_sums)


def _gram_sq_norms(views: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Squared norms [B] of the per-sample gradients sum_u g_u^T a_u, from Gram matrices: the sum over
    every pair of uses (u, v) of <a_u a_v^T, g_u g_v^T> (each unordered pair twice)."""
    sq = None
    for u, (a_u, g_u) in enumerate(views):
        for v in range(u, len(views)):
            a_v, g_v = views[v]
            term = (torch.bmm(a_u, a_v.mT) * torch.bmm(g_u, g_v.mT)).sum((1, 2))
            term = term if v == u else 2 * term
            sq = term if sq is None else sq + term
    return sq.clamp(min=0)


def _sq_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """Each sample's squared norm [B] of per-sample tensors [B, ...], in one pass (no squared copy)."""
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1).square()


def _form_per_sample(batch: int, tokens: int, din: int, dout: int) -> bool:
    """Whether forming a matmul layer's per-sample gradients beats its ghost norm + book-keeping sum.

    Ghost costs B T^2 (din + dout) for the Gram matrices plus B T din dout for the clipped sum; the
    per-sample gradients cost B T din dout once, plus their memory traffic. Measured on the 2-core
    machines at 1 thread (batch 256, uses of 14 + 51 tokens, norms and clipped sum, ms formed / ghost):
    the default body's MLP layers, T^2 (din + dout) = 49.5 din dout, 25 / 21 and 24 / 18; its attention
    projection, 66 din dout, 7.5 / 11; the decoder's 64->192 layer (51 tokens), 54 din dout, 9.6 / 18.
    So forming wins from about 52 din dout (the 2D mae+rotation DP step, best of 5 on an idle machine:
    1.42-1.58x a plain one with a bound of 50 to 60, 1.55-1.56x with the former 24), while the per-sample
    gradients fit in the cache (at 50 MB, B = 256, they ran 2x slower than ghost).
    """
    return tokens * tokens * (din + dout) >= 52 * din * dout and batch * din * dout <= 2**23


_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                     3: torch.nn.grad.conv3d_weight}


def _grouped_conv_wins(layer: nn.Module, use: _Use) -> bool:
    """Whether :func:`_conv_per_sample` beats Opacus's unfold for this conv use.

    Measured at 1 thread on the 2-core machines (Opacus unfold / grouped, ms): the 3D stem's stages
    with 21952, 2744 and 343 output positions 297/62, 643/102, 180/27; with 64 positions 62/84. The 2D
    stem's 32->64 stage (196 positions) 71/22; its 64->128 stage (49 positions) 55/158; its first
    conv (one input channel, 9 values per position) 3/9. The grouped convolution wins once the output
    has a few hundred positions and each position reads more than a 3x3 single-channel window.
    """
    if not _zero_padded_conv(layer) or layer.padding == "valid":
        return False
    positions = use.grad[0, 0].numel()
    window = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return positions >= 128 and window > 9


def _unfold_wins(layer: nn.Module, use: _Use) -> bool:
    """Whether a conv use's unfolded patches, as a matmul layer's tokens (:func:`_ghost`), beat Opacus.

    Measured at 1 thread on the 2-core machines, two uses (masked reconstruction + rotation), norms and
    clipped sum, ms: the 2D stem's 64->128 stage (batch 256, 49 positions, 576 values per position) 150
    against Opacus's 190-255; the 3D stem's 64->128 stage (batch 64, 64 positions, 1728 values) 109
    against 196; the 2D stem's first conv (784 positions, 9 values) 22 against 8. The grouped
    convolution (:func:`_grouped_conv_wins`) is faster than both where it wins.
    """
    if not _zero_padded_conv(layer) or layer.groups != 1 or _grouped_conv_wins(layer, use):
        return False
    return layer.in_channels * math.prod(layer.kernel_size) > 9


def _conv_per_sample(layer: nn.Module, inputs: list[torch.Tensor], grad: torch.Tensor) -> Grads:
    """Per-sample weight (and bias) gradients of a zero-padded conv: the batch folded into the channels,
    one convolution with ``batch x groups`` groups computes every sample's weight gradient at once."""
    x = inputs[0]
    b, nd = x.shape[0], x.dim() - 2
    weight = layer.weight
    per_sample = _CONV_WEIGHT_GRAD[nd](
        x.reshape(1, -1, *x.shape[2:]), (b * weight.shape[0], *weight.shape[1:]),
        grad.reshape(1, -1, *grad.shape[2:]), stride=layer.stride, padding=layer.padding,
        dilation=layer.dilation, groups=b * layer.groups)
    out = {weight: per_sample.view(b, *weight.shape)}
    if layer.bias is not None:
        out[layer.bias] = grad.flatten(2).sum(2)
    return out


def _materialised(layer: nn.Module, uses: list[_Use], batch: int, trainable: set,
                  sampler: Callable | None = None) -> _Contribution:
    """Per-sample gradients of a small layer (``sampler``, else Opacus's grad sampler or functorch),
    summed over its uses."""
    sampler = sampler or GradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
    per_sample: Grads = {}
    for u in uses:
        for p, gs in sampler(layer, u.inputs, u.grad).items():
            if p in trainable:
                per_sample[p] = per_sample[p] + gs if p in per_sample else gs
    sq = sum(_sq_norms(gs) for gs in per_sample.values())

    def clipped_sums(factor: torch.Tensor) -> Grads:
        return {p: factor @ gs.reshape(batch, -1) for p, gs in per_sample.items()}

    return _Contribution(sq, clipped_sums)


@register_grad_sampler(MaskedGroupNorm)
def _masked_group_norm_per_sample(layer: MaskedGroupNorm, inputs: list[torch.Tensor],
                                  grad: torch.Tensor) -> Grads:
    """Per-sample gradients of a GroupNorm, with or without its keep mask (``inputs`` = [x] or [x, keep]).

    Opacus's GroupNorm rule would renormalise over every position; a sparse stem's statistics skip
    the hidden ones, and its affine output is zeroed there, so neither parameter sees them.
    """
    keep = inputs[1] if len(inputs) > 1 else None
    visible_grad = grad if keep is None else grad * keep
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (layer.normalised(inputs[0], keep) * visible_grad).flatten(2).sum(2)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = visible_grad.flatten(2).sum(2)
    return out


class HooksClipping:
    """Opacus's GradSampleModule: hooks materialise per-sample gradients; the DPOptimizer clips them.

    Same interface as :class:`GhostClipper` (``recording``, ``backward``, ``close``).
    """

    def __init__(self, model: torch.nn.Module):
        # Opacus 1.6's conv grad sampler returns wrong per-sample weight gradients for a channels-last
        # conv weight (checked against per-sample autograd; biases are right), so its clipping norms
        # would be wrong. Ghost clipping handles any layout (tests/test_dp_clipping.py).
        strided = [n for n, p in model.named_parameters() if p.requires_grad and not p.is_contiguous()]
        if strided:
            raise ValueError(f"dp_clipping 'hooks' needs C-contiguous parameters; {', '.join(strided)} "
                             "is not (channels-last?): use model.to(memory_format=torch.contiguous_format) "
                             "or dp_clipping 'ghost'")
        self.gsm = GradSampleModule(model, loss_reduction="mean")

    def recording(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def close(self) -> None:
        self.gsm._close()
