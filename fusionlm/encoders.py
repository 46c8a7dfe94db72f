"""Image encoders: an ``ImageBatch`` -> features (I, N, D), one registry entry per kind.

Each encoder exposes ``out_dim`` and ``grid`` (rows, cols of output tokens at the configured
size) so connectors and the image layout size themselves from it, and ``mean``/``std`` for the
letterbox preprocessing. Towers come from transformers: a tiny random config, a pretrained
checkpoint (``hf``), or a recorded architecture (``arch``, when a checkpoint is reloaded).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, MllamaVisionConfig, MllamaVisionModel, SiglipVisionConfig, SiglipVisionModel,
)

from .config import EncoderConfig
from .data.processing import ImageBatch, pretrained_processor
from .errors import ConfigError
from .hub import arch_of, config_from_arch, load_pretrained, torch_dtype
from .registry import Registry

ENCODERS: Registry[type["ImageEncoder"]] = Registry("encoder", "model.encoder.kind")


class ImageEncoder(nn.Module):
    out_dim: int
    grid: tuple[int, int]
    image_size: int  # the side of a letterboxed input
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
    """A transformers vision tower, built from ``arch``, ``hf`` or the recipe's sizes."""

    model_cls: type
    config_cls: type
    model_types: tuple[str, ...]  # checkpoints this kind loads: the tower alone or the full model
    extra_config: dict = {}  # config fields a fresh (random) tower of this kind sets

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config)
        if config.arch is not None and not (pretrained and config.hf):
            arch = config_from_arch(config.arch, key="model.encoder.arch")
            if not isinstance(arch, self.config_cls):
                raise ConfigError(f"model.encoder.arch: a {arch.model_type!r} tower, not one of kind {config.kind!r}")
            self.tower = self.model_cls._from_config(arch, dtype=torch_dtype(config.dtype))
        elif config.hf:
            self.tower = load_pretrained(self.model_cls, config.hf, dtype=config.dtype,
                                         allow_custom_code=config.allow_custom_code, key="model.encoder.hf",
                                         model_types=self.model_types)
            config.arch = arch_of(self.tower.config)
            if config.preprocess == "hf" and config.processor is None:
                config.processor = pretrained_processor(config.hf)
        else:
            self.tower = self.model_cls._from_config(self._tiny_config(config), dtype=torch_dtype(config.dtype))
        vision = self.tower.config
        self.out_dim = vision.hidden_size
        self.image_size = vision.image_size  # the tower's own: a pretrained one may differ from the recipe's
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)

    def _tiny_config(self, c: EncoderConfig):
        return self.config_cls(
            image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size, **self.extra_config,
        )

    def forward(self, images: ImageBatch) -> torch.Tensor:
        pixels = images.pixel_values.to(self.tower.dtype)  # (I, 3, H, W)
        out = self.tower(pixel_values=pixels, output_hidden_states=True)
        feats = out.hidden_states[self.config.feature_layer]  # (I, [1+] N, D)
        if self.has_cls and self.config.drop_cls:
            feats = feats[:, 1:]  # (I, N, D)
        return feats


@ENCODERS.register("siglip")
class SiglipEncoder(_HFVisionTower):
    config_cls, model_cls = SiglipVisionConfig, SiglipVisionModel
    model_types = ("siglip_vision_model", "siglip")

    # A fresh tower has no use for the attention-pooling head: features are taken per patch.
    extra_config = {"vision_use_head": False}


@ENCODERS.register("clip")
class ClipEncoder(_HFVisionTower):
    config_cls, model_cls = CLIPVisionConfig, CLIPVisionModel
    model_types = ("clip_vision_model", "clip")

    has_cls = True
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config, pretrained=pretrained)
        if not config.drop_cls:
            self.grid = (1, self.grid[0] * self.grid[1] + 1)  # CLS + patches as one row


@ENCODERS.register("mllama")
class MllamaEncoder(_HFVisionTower):
    """Llama 3.2 Vision's tiled tower: each image is up to ``max_num_tiles`` tiles of
    ``image_size``², with aspect-ratio embeddings; its output concatenates the final layer with
    intermediate layers (``vision_output_dim`` wide), CLS included, one row per tile."""

    config_cls, model_cls = MllamaVisionConfig, MllamaVisionModel
    model_types = ("mllama_vision_model", "mllama")

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config, pretrained=pretrained)
        vision = self.tower.config
        self.out_dim = vision.vision_output_dim
        self.grid = (vision.max_num_tiles, self.tower.num_patches)  # tiles × (CLS + patches)
        self.mean, self.std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def _tiny_config(self, c: EncoderConfig):
        return MllamaVisionConfig(
            image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers, num_global_layers=1, attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size, intermediate_layers_indices=[0],
            vision_output_dim=2 * c.hidden_size, max_num_tiles=4,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [2, 2], [4, 1]],
        )

    def forward(self, images: ImageBatch) -> torch.Tensor:
        pixels = images.pixel_values.to(self.tower.dtype)  # (I, tiles, 3, h, w)
        if pixels.dim() != 5:
            raise ConfigError("model.encoder: the mllama tower takes tiled images (set model.encoder.preprocess: hf)")
        out = self.tower(
            pixel_values=pixels[:, None], aspect_ratio_ids=images.extras["aspect_ratio_ids"][:, None],
            aspect_ratio_mask=images.extras["aspect_ratio_mask"][:, None],
        ).last_hidden_state  # (I, 1, tiles, P, D)
        return out.reshape(out.shape[0], -1, out.shape[-1])  # (I, tiles*P, D)


@ENCODERS.register("patches")
class PatchEncoder(ImageEncoder):
    """No encoder at all (Fuyu): each raw patch, flattened, is a token's feature vector.

    A patch flattens as (row, col, channel), Fuyu's order, so imported weights apply as they are.
    Images of different sizes arrive already cut into patches (``(ΣN, p*p*3)``) and are padded
    here to the longest; ``ImageBatch.grids`` says how many tokens of each are real.
    """

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config)
        p = config.patch_size
        self.image_size = config.image_size
        self.out_dim = 3 * p * p
        side = config.image_size // p
        self.grid = (side, side)

    def forward(self, images: ImageBatch) -> torch.Tensor:
        x = images.pixel_values
        if x.dim() == 2:  # (ΣN, p*p*3): patches of images of different sizes, in order
            return images.pad_tokens(x)  # (I, N_max, p*p*3)
        p = self.config.patch_size
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p)  # (I, C, rows, p, cols, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # (I, rows, cols, p, p, C)
        return x.reshape(n, (h // p) * (w // p), p * p * c)  # (I, N, p*p*3), row-major


def build_encoder(config: EncoderConfig, *, pretrained: bool = True) -> ImageEncoder:
    return ENCODERS.get(config.kind)(config, pretrained=pretrained)
