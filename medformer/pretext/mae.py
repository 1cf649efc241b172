"""Masked reconstruction (``mae``; He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The data path of the MAE reference code: ``random_masking`` keeps a random subset of the patch
tokens, ``forward_encoder`` runs only those (and the dataset's latents) through the shared body,
``forward_decoder`` (a light decoder) predicts every patch's pixels from the visible ones and mask
tokens, and ``forward_loss`` is the mean squared error over the masked patches, each target
normalised per patch (MAE's ``norm_pix_loss``). The loss of image i depends on image i alone.

With a convolutional stem (``layers.ConvStem``) a token sees its neighbours' pixels, so masked content
is kept out of the stem, in one of two ways (``MedformerConfig.stem_masking``): ``pixels`` zeroes the
masked patches in the image before the stem; ``sparse`` runs the stem as SparK's sparse convolution
(Tian et al. 2023), which also keeps the zeros out of its GroupNorm statistics and the hard edges
between visible and zeroed cells out of its convolutions. Either way no visible token carries a
masked pixel. For a linear patch embedding this changes nothing (each token sees its own patch only).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medformer.data import get_info
from medformer.layers import AddPosition, Block, MaskFill, visible_map
from medformer.model import Medformer, MedformerConfig
from medformer.pretext.base import PretextTask, patchify
from medformer.seeding import derived_seed


def geometry(cfg: MedformerConfig, flag: str, size: int) -> tuple[str, int, int, int, int]:
    """(key, ndim, grid, patch, channels) of a dataset's token grid; key = ``<input kind>-<size>``."""
    info = get_info(flag)
    ndim = 3 if info.is_3d else 2
    grid = cfg.grid_3d if info.is_3d else cfg.grid_2d
    return f"{info.input_kind}-{size}", ndim, grid, size // grid, info.n_channels


def hide_masked(x: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Images with the masked patches set to 0: x [B, C, *S], mask [B, N] (1 = masked) on the token
    grid (row-major, as ``patchify``), ``patch`` pixels per token side."""
    return x * visible_map(mask, x.shape[-1] // patch, x.shape[2:]).to(x.dtype)


class MAEDecoder(nn.Module):
    """Light decoder: visible tokens + mask tokens -> pixels of every patch, per token grid."""

    def __init__(self, cfg: MedformerConfig, datasets: Sequence[tuple[str, int]]):
        super().__init__()
        d = cfg.decoder_dim
        self.embed = nn.Linear(cfg.dim, d)
        self.mask = MaskFill(d)
        self.positions = nn.ModuleDict()
        self.pixels = nn.ModuleDict()
        for flag, size in datasets:
            key, ndim, grid, patch, ch = geometry(cfg, flag, size)
            if key not in self.positions:
                self.positions[key] = AddPosition(grid, ndim, d)
                self.pixels[key] = nn.Linear(d, patch**ndim * ch)
        self.blocks = nn.Sequential(*[Block(d, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(d)

    def forward(self, encoded: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, key: str,
                num_latents: int) -> torch.Tensor:
        """Predicted pixels of every patch.

        encoded: [B, T + n_keep, dim] body output, latents first; ids_keep: [B, n_keep] positions of
        the visible tokens; mask: [B, N], 1 = masked, 0 = visible; key: the token grid. -> [B, N, p^ndim * C]
        """
        h = self.embed(encoded)                                        # [B, T + n_keep, d]
        b, n = mask.shape
        d = h.shape[-1]
        full = torch.zeros(b, n, d, device=h.device, dtype=h.dtype).scatter(
            1, ids_keep[..., None].expand(-1, -1, d), h[:, num_latents:]
        ) + self.mask(mask[..., None])
        decoded = self.blocks(torch.cat([h[:, :num_latents], self.positions[key](full)], dim=1))
        return self.pixels[key](self.norm(decoded)[:, num_latents:])


class MaskedReconstruction(PretextTask):
    name = "mae"
    per_sample = True

    def __init__(self, *, mask_ratio: float = 0.75, norm_pix: bool = True):
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix  # targets normalised per patch (MAE's norm_pix_loss)

    def build_head(self, cfg, datasets):
        return MAEDecoder(cfg, datasets)

    # ---- the data path ---------------------------------------------------------------------------
    def random_masking(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """noise [B, N] -> (ids_keep [B, n_keep], mask [B, N]): the lowest-noise tokens stay visible."""
        b, n = noise.shape
        n_keep = max(1, int(round(n * (1 - self.mask_ratio))))
        ids_shuffle = noise.argsort(dim=1)
        mask = torch.ones(b, n, device=noise.device)                   # 1 = masked, 0 = visible
        mask[:, :n_keep] = 0
        return ids_shuffle[:, :n_keep], torch.gather(mask, 1, ids_shuffle.argsort(dim=1))

    def forward_encoder(self, model: Medformer, x: torch.Tensor, dataset: str, ids_keep: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        """Masked cells kept out of the stem, then only the visible tokens (and the latents) through the
        body: [B, T + n_keep, dim]."""
        if model.cfg.stem_masking == "sparse":
            tokens = model.patch_tokens(x, dataset, mask)  # [B, N, dim]
        else:
            patch = model.tokenizer(dataset, x.shape[-1]).patch
            tokens = model.patch_tokens(hide_masked(x, mask, patch), dataset)
        visible = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        return model.encode_tokens(visible, dataset)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
        """Mean squared error over the masked patches, per sample: [B]."""
        target = patchify(x, patch)
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum(1) / mask.sum(1)

    def masked_losses(self, model: Medformer, x: torch.Tensor, dataset: str, noise: torch.Tensor) -> torch.Tensor:
        """Loss terms [B] with the mask fixed by ``noise`` [B, N] (lowest values stay visible)."""
        tok = model.tokenizer(dataset, x.shape[-1])
        key = f"{model.info(dataset).input_kind}-{x.shape[-1]}"
        ids_keep, mask = self.random_masking(noise)
        encoded = self.forward_encoder(model, x, dataset, ids_keep, mask)
        pred = model.outputs[self.name](encoded, ids_keep, mask, key, model.cfg.num_latents)
        return self.forward_loss(x, pred, mask, tok.patch)

    def losses(self, model, x, dataset, generator=None):
        n = model.tokenizer(dataset, x.shape[-1]).num_tokens
        # Drawn on the CPU (where the seeded generator lives), then moved: the same masks on any device.
        return self.masked_losses(model, x, dataset, torch.rand(x.shape[0], n, generator=generator).to(x.device))

    def fixed_view_losses(self, model, x, dataset, *, views, seed):
        """The same ``views`` masks for every image (a score does not depend on the batch)."""
        n = model.tokenizer(dataset, x.shape[-1]).num_tokens
        masks = [torch.rand(n, generator=torch.Generator().manual_seed(derived_seed(seed, self.name, v)))
                 for v in range(views)]
        return [self.masked_losses(model, x, dataset, m.expand(x.shape[0], -1).to(x.device)) for m in masks]
