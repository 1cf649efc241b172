"""What a hospital would train instead of joining the federation: a small supervised CNN.

``SmallCNN`` is a plain GroupNorm CNN (no BatchNorm, so it could even run under DP-SGD) with about
the parameters of the default Medformer's path for one dataset (~0.6M). It has the interface
``medformer.eval`` needs (``info``, ``embed``, ``fine_tune_parts``, ``forward(x, dataset)``), so the
benchmark gives it exactly the fine-tune recipe it gives the Medformer: the baseline is as strong
as our recipe makes it, not a strawman.
"""
from __future__ import annotations

import torch
from torch import nn

from medformer.data import DatasetInfo, get_info


class SmallCNN(nn.Module):
    """Stages of 3x3 conv-GroupNorm-GELU pairs with 2x max-pooling between them, global average
    pooling and a linear head: [B, C, *S] -> [B, num_outputs].

    Args:
        dataset: the MedMNIST flag it classifies (input kind and head size from ``medmnist.INFO``).
        widths: channels per stage; default 48-96-192 in 2D, 24-48-96 in 3D (a 3D kernel has 27 taps).
        convs_per_stage: conv layers per stage.
    """

    def __init__(self, dataset: str, *, widths: tuple[int, ...] | None = None, convs_per_stage: int = 2):
        super().__init__()
        self.dataset = dataset
        self._info = get_info(dataset)
        ndim = 3 if self._info.is_3d else 2
        widths = widths or ((24, 48, 96) if ndim == 3 else (48, 96, 192))
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        pool = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        c = self._info.n_channels
        for i, w in enumerate(widths):
            if i:
                layers.append(pool(2))
            for _ in range(convs_per_stage):
                layers += [conv(c, w, kernel_size=3, padding=1, bias=False), nn.GroupNorm(min(8, w), w), nn.GELU()]
                c = w
        self.features = nn.Sequential(*layers)
        # Channels-last: oneDNN's fast conv layout on CPU (same outputs; tests/test_benchmarks.py).
        self.memory_format = torch.channels_last if ndim == 2 else torch.channels_last_3d
        self.features.to(memory_format=self.memory_format)
        self.head = nn.Linear(c, self._info.num_outputs)
        self._dim = c

    @property
    def embed_dim(self) -> int:
        return self._dim

    def info(self, dataset: str) -> DatasetInfo:
        if dataset != self.dataset:
            raise KeyError(f"dataset {dataset!r} is not this model's; it classifies {self.dataset!r}")
        return self._info

    def embed(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """Globally pooled features [B, embed_dim]."""
        self.info(dataset)
        return self.features(x.contiguous(memory_format=self.memory_format)).flatten(2).mean(-1)

    def forward(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        return self.head(self.embed(x, dataset))

    def fine_tune_parts(self, dataset: str, *, seed: int = 0) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Its head and its feature extractor (everything trains)."""
        self.info(dataset)
        for p in self.parameters():
            p.requires_grad_(True)
        return list(self.head.parameters()), list(self.features.parameters())


def small_cnn(dataset: str, *, seed: int = 0) -> SmallCNN:
    """A freshly initialised SmallCNN for ``dataset`` (seeded; the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(dataset)
