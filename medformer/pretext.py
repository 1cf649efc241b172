"""Self-supervised pretext tasks, one interface, 2D and 3D alike.

Every task returns one loss term per sample, ``[B]``; the objective is their weighted mean. A task
declares ``per_sample = True`` when sample i's term depends on sample i alone, so the batch loss is a
sum of per-sample terms: the condition DP-SGD's guarantee needs (Abadi et al. 2016). Tasks with
in-batch negatives (InfoNCE) are not per-sample and must not run under DP-SGD.

Tasks:
* ``mae``: masked patch reconstruction (He et al. 2022): the body encodes only the visible tokens, a
  light decoder predicts the masked patches' pixels, normalised per patch.
* ``rotation``: predict the rotation applied (Gidaris et al. 2018): 4 classes in 2D; in 3D the
  identity plus 90/180/270 degrees about each of the three axes (10 classes).
* ``simsiam``: two augmented views, predictor + stop-gradient (Chen & He 2021); per-sample.
* ``contrastive``: two views, NT-Xent with in-batch negatives (Chen et al. 2020); NOT per-sample.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medformer.data import get_info
from medformer.layers import AddPosition, Block, MaskFill, Mlp
from medformer.model import DatasetRef, Medformer, MedformerConfig, _normalise


def _geometry(cfg: MedformerConfig, flag: str, size: int) -> tuple[str, int, int, int, int]:
    """(key, ndim, grid, patch, channels) of a dataset's token grid."""
    info = get_info(flag)
    ndim = 3 if info.is_3d else 2
    grid = cfg.grid_3d if info.is_3d else cfg.grid_2d
    return f"{info.input_kind}-{size}", ndim, grid, size // grid, info.n_channels


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Images to flattened patches in the tokenizer's (row-major) order.

    2D: [B, C, H, W] -> [B, (H/p)(W/p), p*p*C];  3D: [B, C, D, H, W] -> [B, (D/p)(H/p)(W/p), p^3*C].
    """
    b, c, *spatial = x.shape
    g = [s // patch for s in spatial]
    if len(spatial) == 2:
        x = x.reshape(b, c, g[0], patch, g[1], patch).permute(0, 2, 4, 3, 5, 1)
    else:
        x = x.reshape(b, c, g[0], patch, g[1], patch, g[2], patch).permute(0, 2, 4, 6, 3, 5, 7, 1)
    n = 1
    for gi in g:
        n *= gi
    return x.reshape(b, n, -1)


class PretextTask(ABC):
    """A self-supervised task: builds its head, returns per-sample loss terms."""

    name: ClassVar[str]
    per_sample: ClassVar[bool]

    @abstractmethod
    def build_head(self, cfg: MedformerConfig, datasets: Sequence[tuple[str, int]]) -> nn.Module:
        """The task's ``outputs.<name>`` module for these (flag, size) datasets."""

    @abstractmethod
    def losses(self, model: Medformer, x: torch.Tensor, dataset: str,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Loss terms [B] for a batch x of ``dataset`` (values in [-1, 1])."""


# --------------------------------------------------------------------------------------------------
# Masked reconstruction
# --------------------------------------------------------------------------------------------------
class MAEDecoder(nn.Module):
    """Light decoder: visible tokens + mask tokens -> pixels of every patch."""

    def __init__(self, cfg: MedformerConfig, datasets: Sequence[tuple[str, int]]):
        super().__init__()
        d = cfg.decoder_dim
        self.embed = nn.Linear(cfg.dim, d)
        self.mask = MaskFill(d)
        self.positions = nn.ModuleDict()
        self.pixels = nn.ModuleDict()
        for flag, size in datasets:
            key, ndim, grid, patch, ch = _geometry(cfg, flag, size)
            if key not in self.positions:
                self.positions[key] = AddPosition(grid, ndim, d)
                self.pixels[key] = nn.Linear(d, patch**ndim * ch)
        self.blocks = nn.Sequential(*[Block(d, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(d)


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

    def losses(self, model, x, dataset, generator=None, noise: torch.Tensor | None = None):
        """``noise`` [B, N] fixes the mask (lowest values stay visible); random when None."""
        head: MAEDecoder = model.outputs[self.name]
        tok = model.tokenizer(dataset, x.shape[-1])
        key = f"{model.info(dataset).input_kind}-{x.shape[-1]}"
        tokens = model.patch_tokens(x, dataset)                        # [B, N, dim]
        b, n, dim = tokens.shape
        n_keep = max(1, int(round(n * (1 - self.mask_ratio))))
        if noise is None:
            noise = torch.rand(b, n, generator=generator, device=x.device)
        ids_shuffle = noise.argsort(dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        mask = torch.ones(b, n, device=x.device)                       # 1 = masked, 0 = visible
        mask[:, :n_keep] = 0
        mask = torch.gather(mask, 1, ids_shuffle.argsort(dim=1))
        visible = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, dim))
        encoded = head.embed(model.encode_tokens(visible, dataset))    # [B, T + n_keep, d]
        t = model.cfg.num_latents
        d = encoded.shape[-1]
        full = torch.zeros(b, n, d, device=x.device, dtype=encoded.dtype).scatter(
            1, ids_keep[..., None].expand(-1, -1, d), encoded[:, t:]
        ) + head.mask(mask[..., None])
        decoded = head.blocks(torch.cat([encoded[:, :t], head.positions[key](full)], dim=1))
        pred = head.pixels[key](head.norm(decoded)[:, t:])             # [B, N, p^ndim * C]
        target = patchify(x, tok.patch)
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum(1) / mask.sum(1)


# --------------------------------------------------------------------------------------------------
# Rotation prediction
# --------------------------------------------------------------------------------------------------
_PLANES_3D = ((2, 3), (2, 4), (3, 4))  # rotations about the W, H and D axes of [B, C, D, H, W]


def num_rotations(ndim: int) -> int:
    return 4 if ndim == 2 else 1 + 3 * len(_PLANES_3D)


def rotate(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotate each sample by its label's rotation (see module docstring for the classes)."""
    out = x.clone()
    ndim = x.dim() - 2
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        if ndim == 2:
            out[idx] = torch.rot90(x[idx], c, dims=(2, 3))
        elif c > 0:
            plane = _PLANES_3D[(c - 1) // 3]
            out[idx] = torch.rot90(x[idx], (c - 1) % 3 + 1, dims=plane)
    return out


class RotationHead(nn.Module):
    def __init__(self, cfg: MedformerConfig, ndims: Sequence[int]):
        super().__init__()
        self.heads = nn.ModuleDict(
            {f"{n}d": nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, num_rotations(n)))
             for n in sorted(set(ndims))}
        )


class RotationPrediction(PretextTask):
    name = "rotation"
    per_sample = True

    def build_head(self, cfg, datasets):
        return RotationHead(cfg, [3 if get_info(f).is_3d else 2 for f, _ in datasets])

    def losses(self, model, x, dataset, generator=None, labels: torch.Tensor | None = None):
        """``labels`` [B] fixes each sample's rotation class; random when None."""
        ndim = x.dim() - 2
        if labels is None:
            labels = torch.randint(0, num_rotations(ndim), (x.shape[0],), generator=generator).to(x.device)
        feats = model.embed(rotate(x, labels), dataset)
        logits = model.outputs[self.name].heads[f"{ndim}d"](feats)
        return F.cross_entropy(logits, labels, reduction="none")


# --------------------------------------------------------------------------------------------------
# Two-view tasks
# --------------------------------------------------------------------------------------------------
def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random view of a batch in [-1, 1], safe for medical images in 2D and 3D.

    Per sample: mild zoom (0.8-1.0) and shift (up to 10%), random flips along each spatial axis,
    contrast (x0.8-1.2) and brightness (+-0.1) jitter, Gaussian noise (sigma 0.03). No colour
    changes: colour carries diagnosis in fundus photos.
    """
    b, ndim = x.shape[0], x.dim() - 2

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    theta = torch.zeros(b, ndim, ndim + 1)
    scale = u(0.8, 1.0)
    flips = torch.where(u(0, 1, ndim) < 0.5, -1.0, 1.0)
    for a in range(ndim):
        theta[:, a, a] = scale * flips[:, a]
    theta[:, :, ndim] = u(-0.1, 0.1, ndim)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # Sample around -1 (black) as background: shift into [0, 2] so zero padding means black.
    out = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    view = [b] + [1] * (ndim + 1)
    out = out * u(0.8, 1.2).view(view).to(x) + u(-0.1, 0.1).view(view).to(x)
    noise = torch.randn(out.shape, generator=generator).to(x)
    return (out + 0.03 * noise).clamp(-1, 1)


class ProjectionHead(nn.Module):
    """Projector (and predictor for SimSiam) with LayerNorm instead of BatchNorm (Opacus)."""

    def __init__(self, cfg: MedformerConfig, predictor: bool):
        super().__init__()
        self.projector = nn.Sequential(nn.LayerNorm(cfg.dim), Mlp(cfg.dim, cfg.dim, cfg.dim))
        self.predictor = (nn.Sequential(nn.LayerNorm(cfg.dim), Mlp(cfg.dim, cfg.dim // 2, cfg.dim))
                          if predictor else nn.Identity())


class SimSiam(PretextTask):
    name = "simsiam"
    per_sample = True

    def build_head(self, cfg, datasets):
        return ProjectionHead(cfg, predictor=True)

    def losses(self, model, x, dataset, generator=None):
        head: ProjectionHead = model.outputs[self.name]
        z1 = head.projector(model.embed(augment(x, generator), dataset))
        z2 = head.projector(model.embed(augment(x, generator), dataset))
        p1, p2 = head.predictor(z1), head.predictor(z2)
        # Negative cosine similarity with stop-gradient on the target branch, symmetrised.
        return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1) + F.cosine_similarity(p2, z1.detach(), dim=-1))


class Contrastive(PretextTask):
    name = "contrastive"
    per_sample = False  # in-batch negatives: each term depends on the whole batch

    def __init__(self, *, temperature: float = 0.2):
        self.temperature = temperature

    def build_head(self, cfg, datasets):
        return ProjectionHead(cfg, predictor=False)

    def losses(self, model, x, dataset, generator=None):
        head: ProjectionHead = model.outputs[self.name]
        z = torch.cat([head.projector(model.embed(augment(x, generator), dataset)) for _ in range(2)])
        z = F.normalize(z, dim=-1)
        b = x.shape[0]
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        per_view = F.cross_entropy(sim, target, reduction="none")
        return 0.5 * (per_view[:b] + per_view[b:])


TASKS: dict[str, type[PretextTask]] = {
    t.name: t for t in (MaskedReconstruction, RotationPrediction, SimSiam, Contrastive)
}


class PretextObjective:
    """Weighted combination of pretext tasks.

    Args:
        weights: task name -> weight (> 0), e.g. ``{"mae": 1.0, "rotation": 0.5}``.
        mask_ratio: fraction of patches masked by ``mae``.
    """

    def __init__(self, weights: Mapping[str, float], *, mask_ratio: float = 0.75):
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown pretext task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if not weights:
            raise ValueError("at least one pretext task is needed")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"pretext weights must be > 0, got {bad}")
        self.weights = dict(weights)
        self.tasks: dict[str, PretextTask] = {
            n: MaskedReconstruction(mask_ratio=mask_ratio) if n == "mae" else TASKS[n]() for n in weights
        }

    @property
    def per_sample(self) -> bool:
        """True when the combined loss is a sum of per-sample terms (DP-SGD may run it)."""
        return all(t.per_sample for t in self.tasks.values())

    def non_per_sample_tasks(self) -> list[str]:
        return [n for n, t in self.tasks.items() if not t.per_sample]

    def build_heads(self, cfg: MedformerConfig, datasets: Sequence[DatasetRef]) -> dict[str, nn.Module]:
        ds = _normalise(datasets)
        return {n: t.build_head(cfg, ds) for n, t in self.tasks.items()}

    def __call__(self, model: Medformer, x: torch.Tensor, dataset: str,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean of the weighted per-sample terms, and each task's mean loss."""
        total = torch.zeros(x.shape[0], device=x.device)
        parts: dict[str, float] = {}
        for name, task in self.tasks.items():
            terms = task.losses(model, x, dataset, generator)
            total = total + self.weights[name] * terms
            parts[name] = float(terms.detach().mean()) if terms.numel() else 0.0
        return total.mean(), parts


def build_pretext_model(cfg: MedformerConfig, datasets: Sequence[DatasetRef], objective: PretextObjective,
                        *, downstream_heads: bool = False) -> Medformer:
    """A Medformer carrying the objective's pretext heads (a hospital's model has no downstream heads)."""
    return Medformer(cfg, datasets, downstream_heads=downstream_heads,
                     extra_outputs=objective.build_heads(cfg, datasets))
