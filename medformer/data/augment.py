"""Random views of medical images (2D and 3D): what two-view pretext tasks and augmented fine-tunes see."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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
