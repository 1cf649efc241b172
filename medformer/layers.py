"""Small building blocks of the Medformer, all Opacus-compatible.

Attention is written from ``nn.Linear`` (Opacus has per-sample gradient rules for it, not for
``nn.MultiheadAttention``); normalisation is LayerNorm or GroupNorm (no BatchNorm). Modules that own a
raw ``nn.Parameter`` take exactly one batched tensor as input: Opacus's functorch fallback recomputes
their per-sample gradients from that first input alone. (``MaskedGroupNorm`` takes a second, its
keep mask, and has its own grad sampler in ``medformer.dp.clipping``.)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Two-layer perceptron with GELU: [B, L, dim] -> [B, L, out_dim]."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)  # [B, heads, L, d_head]


class Attention(nn.Module):
    """Multi-head self-attention from Linear layers: [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Queries attend to a context: q [B, Q, dim], ctx [B, L, dim] -> [B, Q, dim]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(ctx).chunk(2, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (self.q(q), k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    ``own_norms=False`` builds it without its two LayerNorms: the caller passes them to ``forward``
    (a site's own norms around a shared block, ``model.Body``).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, own_norms: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if own_norms else None
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if own_norms else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, norms: tuple[nn.Module, nn.Module] | None = None) -> torch.Tensor:
        norm1, norm2 = norms if norms is not None else (self.norm1, self.norm2)
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block for query tokens over a context."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_ctx(ctx))
        return q + self.mlp(self.norm2(q))


def sincos_table(grid: int, ndim: int, dim: int) -> torch.Tensor:
    """Fixed sine-cosine position table for a ``grid``^ndim token grid: [grid**ndim, dim]."""
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(grid, dtype=torch.float32)] * ndim, indexing="ij"), dim=-1
    ).reshape(-1, ndim)
    per_axis = max(2, (dim // ndim) // 2 * 2)
    freqs = 1.0 / (10000 ** (torch.arange(per_axis // 2, dtype=torch.float32) / (per_axis // 2)))
    parts = []
    for a in range(ndim):
        angles = coords[:, a : a + 1] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))[:, :dim]


class AddPosition(nn.Module):
    """Adds a learnable position table (initialised sin-cos): [B, N, dim] -> [B, N, dim]."""

    def __init__(self, grid: int, ndim: int, dim: int):
        super().__init__()
        self.pos = nn.Parameter(sincos_table(grid, ndim, dim) * 0.02 / 0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class PatchEmbed(nn.Module):
    """Conv tokenizer with kernel = stride = patch, then positions.

    2D: [B, C, H, W] -> [B, grid^2, dim];  3D: [B, C, D, H, W] -> [B, grid^3, dim].
    """

    def __init__(self, *, ndim: int, in_channels: int, img_size: int, grid: int, dim: int):
        super().__init__()
        if img_size % grid:
            raise ValueError(
                f"token grid {grid} does not divide image size {img_size}; "
                f"use a divisor such as {[g for g in range(2, 17) if img_size % g == 0]}"
            )
        self.ndim, self.in_channels, self.img_size = ndim, in_channels, img_size
        self.grid, self.patch = grid, img_size // grid
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.proj = conv(in_channels, dim, kernel_size=self.patch, stride=self.patch)
        self.position = AddPosition(grid, ndim, dim)

    @property
    def num_tokens(self) -> int:
        return self.grid**self.ndim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, N] (1 = hidden) changes nothing: each token reads its own patch alone, so a
        visible token never sees a hidden pixel (the same interface as :class:`ConvStem`)."""
        expected = (self.in_channels,) + (self.img_size,) * self.ndim
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        return self.position(self.proj(x).flatten(2).transpose(1, 2))


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics may skip hidden positions: SparK's sparse normalisation (Tian et al.
    2023), per sample, for masked image modelling through a conv stem.

    ``forward(x)`` is ``nn.GroupNorm``. ``forward(x, keep)``, keep [B, 1, *S] (1 = visible, 0 = hidden):
    each sample's group mean and variance are taken over its visible positions only, and the output is
    0 at hidden ones, so hidden positions change nothing that a visible one computes. Its per-sample
    gradients (DP-SGD) come from ``medformer.dp.clipping``, which registers them with Opacus.
    """

    def normalised(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x normalised per sample and group, before the affine: [B, C, *S] (0 at hidden positions)."""
        if keep is None:
            return F.group_norm(x, self.num_groups, eps=self.eps)
        b, c = x.shape[:2]
        grouped = x.reshape(b, self.num_groups, c // self.num_groups, -1)
        visible = keep.reshape(b, 1, 1, -1).to(x.dtype)
        count = (visible.sum(-1, keepdim=True) * grouped.shape[2]).clamp(min=1)
        mean = (grouped * visible).sum((2, 3), keepdim=True) / count
        centred = (grouped - mean) * visible
        var = centred.square().sum((2, 3), keepdim=True) / count
        return (centred * torch.rsqrt(var + self.eps)).reshape_as(x)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return super().forward(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (self.normalised(x, keep) * self.weight.view(shape) + self.bias.view(shape)) * keep


def visible_map(mask: torch.Tensor, grid: int, size: Sequence[int]) -> torch.Tensor:
    """Token mask [B, N] (1 = hidden, row-major over a ``grid``-sided token grid) -> [B, 1, *size], 1 where
    visible, for any spatial ``size``: each position takes the token cell it lies in (nearest-neighbour
    resampling; when ``grid`` divides ``size``, exactly the ``size // grid``-sided patch cells)."""
    keep = (1 - mask).float().reshape(mask.shape[0], 1, *(grid,) * len(size))
    return F.interpolate(keep, size=tuple(size), mode="nearest")


class ConvStem(nn.Module):
    """Convolutional tokenizer: 3x3 convolutions (GroupNorm, GELU) that halve the resolution down to
    the token grid, then LayerNorm and positions ("early convolutions help transformers see better",
    Xiao et al. 2021). A stride-1 stage of ``width`` channels at full resolution (``full_res``), then
    stride-2 stages doubling it, the last one of ``dim``. Without ``full_res`` the first conv already
    halves the resolution (cheaper: ``MedformerConfig``'s default for 3D, whose volumes are 27x larger).
    ``depth`` convolutions per stage, the first of them strided (``depth=2`` is the small supervised
    CNN's pattern, ``baselines.SmallCNN``: two 3x3 convs see a 5x5 neighbourhood at each resolution).
    With ``pool`` a stage halves the resolution by 2x max-pooling before its convs, all of stride 1
    (also SmallCNN's pattern: the strongest response of each cell survives, which thin structures such
    as vessels may need), instead of by a strided first conv.

    2D: [B, C, H, W] -> [B, grid^2, dim];  3D: [B, C, D, H, W] -> [B, grid^3, dim]. Token i covers the
    ``patch``-sided cell i of the grid (what masked reconstruction masks and predicts).

    Given a token ``mask`` (masked reconstruction), the stem is SparK's sparse convolution written
    densely: every conv and pooling output is zeroed at hidden cells and every GroupNorm takes its
    statistics over visible cells only (:class:`MaskedGroupNorm`), so a visible token neither reads a
    hidden pixel nor sees the hard zero edges that zeroing hidden pixels in the image would leave.
    """

    def __init__(self, *, ndim: int, in_channels: int, img_size: int, grid: int, dim: int, width: int,
                 full_res: bool, depth: int = 1, pool: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"a conv stem needs at least one conv per stage, got depth={depth}")
        downs = max(1, round(math.log2(img_size / grid)))
        self.ndim, self.in_channels, self.img_size = ndim, in_channels, img_size
        side = img_size
        for _ in range(downs):
            side = (side + 1) // 2  # a 3x3 conv of stride 2 with padding 1
        if img_size % side:
            raise ValueError(f"a conv stem reaches a {side}-token grid from {img_size} pixels, which it does not "
                             f"divide; choose a grid such as {[img_size // 2**k for k in range(1, 5) if img_size % 2**k == 0]}")
        self.grid, self.patch = side, img_size // side
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        stages = [(width, 1)] if full_res else []
        stages += [(width * 2 ** (i + full_res), 2) for i in range(downs - 1)] + [(dim, 2)]
        convs = [(out, stride if j == 0 else 1) for out, stride in stages for j in range(depth)]
        max_pool = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        c = in_channels
        for i, (out, stride) in enumerate(convs):
            normed = i < len(convs) - 1  # a bias before a norm only adds a parameter with no gradient
            if pool and stride == 2:  # ceil_mode: an odd side s -> (s + 1) // 2, as the strided conv gives
                layers.append(max_pool(2, ceil_mode=True))
                stride = 1
            layers.append(conv(c, out, kernel_size=3, stride=stride, padding=1, bias=not normed))
            if normed:
                layers += [MaskedGroupNorm(min(8, out), out), nn.GELU()]
            c = out
        self.convs = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.position = AddPosition(self.grid, ndim, dim)

    @property
    def num_tokens(self) -> int:
        return self.grid**self.ndim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, N] (1 = hidden), optional: the stem then runs sparse (see the class)."""
        expected = (self.in_channels,) + (self.img_size,) * self.ndim
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        features = self.convs(x) if mask is None else self.sparse_convs(x, mask)
        return self.position(self.norm(features.flatten(2).transpose(1, 2)))

    def sparse_convs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The conv stages with hidden cells kept out: [B, C, *S], mask [B, N] -> [B, dim, *grid].

        A position at any resolution is hidden when the token-grid cell it lies in is (nearest-neighbour
        resampling of the grid: at full resolution exactly the ``patch``-sided cells).
        """
        keep = visible_map(mask, self.grid, x.shape[2:]).to(x.dtype)
        h = x * keep
        for layer in self.convs:
            if isinstance(layer, MaskedGroupNorm):
                h = layer(h, keep)
                continue
            h = layer(h)
            if not isinstance(layer, nn.GELU):  # GELU keeps a zero at zero
                if h.shape[2:] != keep.shape[2:]:
                    keep = visible_map(mask, self.grid, h.shape[2:]).to(h.dtype)
                h = h * keep
        return h


class Prepend(nn.Module):
    """Prepends learnable tokens to a sequence: [B, N, dim] -> [B, T + N, dim]."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)


class QueryTokens(nn.Module):
    """Learnable task query tokens, broadcast to the batch of ``x``: [B, ...] -> [B, Q, dim]."""

    def __init__(self, num_queries: int, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.queries.expand(x.shape[0], -1, -1)


class MaskFill(nn.Module):
    """Learnable mask token placed where ``mask`` is 1: mask [B, N, 1] -> [B, N, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.token, std=0.02)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return mask * self.token


class Adapter(nn.Module):
    """Residual bottleneck adapter: x + up(gelu(down(norm(x)))), starting as the identity."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.zero_init()

    def zero_init(self) -> None:
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform Linear weights and zero biases, as in ViT/MAE."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        w = module.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = [
    "Adapter", "AddPosition", "Attention", "Block", "ConvStem", "CrossAttention", "CrossBlock", "MaskFill",
    "MaskedGroupNorm", "Mlp", "PatchEmbed", "Prepend", "QueryTokens", "init_weights", "sincos_table",
    "visible_map",
]
