"""Random views of medical images (2D and 3D): what two-view pretext tasks and augmented fine-tunes see."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_view(x: torch.Tensor, generator: torch.Generator | None = None, *,
                flip_axes: tuple[int, ...] | None = None, zoom: tuple[float, float] = (0.8, 1.0),
                shift: float = 0.1, jitter: bool = True) -> torch.Tensor:
    """Random view of a batch in [-1, 1], safe for medical images in 2D and 3D.

    Per sample: mild zoom (``zoom``, a scale of the sampling grid) and shift (up to ``shift`` of the
    extent), random flips along ``flip_axes`` (spatial axes counted from 0; None: all), and with
    ``jitter`` contrast (x0.8-1.2) and brightness (+-0.1) jitter and Gaussian noise (sigma 0.03). No
    colour changes: colour carries diagnosis in fundus photos.
    """
    b, ndim = x.shape[0], x.dim() - 2
    axes = range(ndim) if flip_axes is None else flip_axes

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    theta = torch.zeros(b, ndim, ndim + 1)
    scale = u(*zoom)
    flips = torch.where(u(0, 1, ndim) < 0.5, -1.0, 1.0)
    # affine_grid's output coordinates run (x, y[, z]): spatial axis a of the tensor is row ndim-1-a.
    for a in range(ndim):
        theta[:, a, a] = scale * (flips[:, a] if (ndim - 1 - a) in axes else 1.0)
    theta[:, :, ndim] = u(-shift, shift, ndim)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # Sample around -1 (black) as background: shift into [0, 2] so zero padding means black.
    out = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    if not jitter:
        return out.clamp(-1, 1)
    view = [b] + [1] * (ndim + 1)
    out = out * u(0.8, 1.2).view(view).to(x) + u(-0.1, 0.1).view(view).to(x)
    noise = torch.randn(out.shape, generator=generator).to(x)
    return (out + 0.03 * noise).clamp(-1, 1)


# Fine-tune augmentation policies by name. "mirror": left-right flips and a small shift only; in
# ultrasound and X-ray, up-down is anatomy (flipping it hurt BreastMNIST on validation).
AUGMENTATIONS = {
    "none": None,
    "mirror": dict(flip_axes=(-1,), zoom=(1.0, 1.0), shift=0.07, jitter=False),
    "views": {},
}


def augment(x: torch.Tensor, policy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` under the named fine-tune augmentation policy (``AUGMENTATIONS``)."""
    try:
        kwargs = AUGMENTATIONS[policy]
    except KeyError:
        raise ValueError(f"unknown augmentation {policy!r}; choose from {', '.join(AUGMENTATIONS)}") from None
    if kwargs is None:
        return x
    flips = kwargs.get("flip_axes")
    if flips is not None:  # negative axes count from the last spatial axis
        kwargs = {**kwargs, "flip_axes": tuple(a % (x.dim() - 2) for a in flips)}
    return random_view(x, generator, **kwargs)
