"""Image encoders: pixels (I, 3, H, W) -> features (I, N, D), one registry entry per kind.

Each encoder exposes ``out_dim`` and ``grid`` (rows, cols of output tokens) so connectors and the
tokenizer's image layout size themselves from it, and ``mean``/``std`` for preprocessing.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from .config import EncoderConfig
from .registry import Registry

ENCODERS: Registry[type["ImageEncoder"]] = Registry("encoder", "model.encoder.kind")


class ImageEncoder(nn.Module):
    out_dim: int
    grid: tuple[int, int]
    has_cls: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class _HFVisionTower(ImageEncoder):
    """A transformers vision tower; the same code path loads pretrained weights via ``hf``."""

    model_cls: type
    config_cls: type
    extra_config: dict = {}  # config fields a fresh (random) tower of this kind sets

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        if config.hf:
            self.tower = self.model_cls.from_pretrained(config.hf, trust_remote_code=False)
        else:
            self.tower = self.model_cls(self._tiny_config(config))
        vision = self.tower.config
        self.out_dim = vision.hidden_size
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)

    def _tiny_config(self, c: EncoderConfig):
        return self.config_cls(
            image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size, **self.extra_config,
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.config.feature_layer]  # (I, [1+] N, D)
        if self.has_cls and self.config.drop_cls:
            feats = feats[:, 1:]  # (I, N, D)
        return feats


@ENCODERS.register("siglip")
class SiglipEncoder(_HFVisionTower):
    config_cls, model_cls = SiglipVisionConfig, SiglipVisionModel

    # A fresh tower has no use for the attention-pooling head: features are taken per patch.
    extra_config = {"vision_use_head": False}


@ENCODERS.register("clip")
class ClipEncoder(_HFVisionTower):
    config_cls, model_cls = CLIPVisionConfig, CLIPVisionModel

    has_cls = True
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        if not config.drop_cls:
            self.grid = (1, self.grid[0] * self.grid[1] + 1)  # CLS + patches as one row


@ENCODERS.register("patches")
class PatchEncoder(ImageEncoder):
    """No encoder at all (Fuyu): each raw patch, flattened, is a token's feature vector."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        p = config.patch_size
        self.out_dim = 3 * p * p
        side = config.image_size // p
        self.grid = (side, side)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        n, c, h, w = pixel_values.shape
        x = pixel_values.reshape(n, c, h // p, p, w // p, p)  # (I, C, rows, p, cols, p)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (I, rows, cols, C, p, p)
        return x.reshape(n, (h // p) * (w // p), c * p * p)  # (I, N, 3*p*p), row-major


def build_encoder(config: EncoderConfig) -> ImageEncoder:
    return ENCODERS.get(config.kind)(config)
