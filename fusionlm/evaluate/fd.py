"""Fréchet distance (FD) between two sets of pictures, with a feature extractor of fusionlm's own.

FID measures it in the features of an Inception network trained on ImageNet. That network can't be
downloaded here, and it was not made for flat shapes on white. So this is **FD, not FID**: the
same statistic (torchmetrics' ``FrechetInceptionDistance`` computes it, given our module), in the
features of ``WorldFeatures``. Those come from a small convolutional network with fixed, seeded
random weights, which respond to colour, edges and their layout; they know no objects. Average-
and max-pooling its two layers gives 64 numbers per picture. The network's name and seed are
part of the figure: an FD is comparable only with another FD of the same extractor
(``WorldFeatures.name``), on pictures of the same size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


class WorldFeatures(nn.Module):
    """Fixed random conv features (seeded): ``(B, 3, H, W)`` in [0, 1] -> ``(B, 64)``."""

    name = "world-random-conv-v1 (seed 0)"
    num_features = 64

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.first = nn.Conv2d(3, 16, 3, padding=1)
        self.second = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        for conv in (self.first, self.second):
            fan_in = conv.in_channels * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * (2 / fan_in) ** 0.5
            conv.bias.data.zero_()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.first(images * 2 - 1))  # (B, 16, H, W)
        b = torch.relu(self.second(a))  # (B, 16, H/2, W/2)
        pooled = [t.mean((2, 3)) for t in (a, b)] + [t.amax((2, 3)) for t in (a, b)]
        return torch.cat(pooled, dim=1).double()  # (B, 64)


def _tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)  # (B, 3, H, W)


def frechet_distance(real: Sequence[Image.Image], generated: Sequence[Image.Image], *, batch: int = 256) -> float:
    """FD between the ``WorldFeatures`` of two sets of same-size pictures (lower is closer)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FD needs at least 2 pictures a side, got {len(real)} and {len(generated)}")
    sizes = {im.size for im in [*real, *generated]}
    if len(sizes) != 1:
        raise ValueError(f"FD compares pictures of one size, got {sorted(sizes)}")
    metric = FrechetInceptionDistance(feature=WorldFeatures(), normalize=True, reset_real_features=True)
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), batch):
            metric.update(_tensor(images[start:start + batch]), real=is_real)
    return float(metric.compute())
