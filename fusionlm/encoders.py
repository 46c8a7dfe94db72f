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
    CLIPVisionConfig, CLIPVisionModel, JanusVisionConfig, MllamaVisionConfig, MllamaVisionModel, Qwen2VLVisionConfig,
    SiglipVisionConfig, SiglipVisionModel,
)
from transformers.models.janus.modeling_janus import JanusVisionModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from .config import EncoderConfig
from .data.pixels.processing import ImageBatch, pretrained_processor
from .errors import ConfigError
from .hub import arch_of, config_from_arch, load_pretrained, torch_dtype
from .registry import Registry

ENCODERS: Registry[type["ImageEncoder"]] = Registry("encoder", "model.encoder.kind")


STEMS = ("patch", "conv")


class ConvStem(nn.Sequential):
    """Stride-2 3x3 convolutions from pixels to the patch grid: (I, 3, H, W) -> (I, D, H/p, W/p).

    Widths double from 16 and end at ``width``, GELU between; ``patch`` is a power of two >= 2
    (starting at 8 was 1.8x cheaper but read worse: word retrieval 0.72 against 0.84 after the
    demo's 800-step read stage). The pixels go in channels-last, where CPU kernels run these narrow
    convolutions faster (fwd+bwd of 64 images at 64 px: 14.9 ms against 18.4 contiguous). Both are
    one-off checks on the 2-core host of 2026-12-07, not kept as benchmarks.
    """

    def __init__(self, channels: int, width: int, patch: int):
        depth = patch.bit_length() - 1
        if patch < 2 or patch != 1 << depth:
            raise ConfigError(f"model.encoder.stem: 'conv' halves the image {depth} times, so "
                              f"model.encoder.patch_size must be a power of two >= 2, not {patch}")
        widths = [channels] + [min(width, 16 << i) for i in range(depth - 1)] + [width]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GELU()]
        super().__init__(*layers[:-1])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return super().forward(pixels.contiguous(memory_format=torch.channels_last))  # (I, D, H/p, W/p)

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight: transformers' embeddings read the patch embedding's
        ``weight.dtype`` to cast the pixels."""
        return self[0].weight


class ImageEncoder(nn.Module):
    out_dim: int
    grid: tuple[int, int]
    image_size: int  # the side of a letterboxed input
    has_cls: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolates: bool = False  # can run above its own size (``resolution``) by interpolating position embeddings
    conv_stem: bool = False  # its patch embedding can be replaced by a ``ConvStem`` (``stem: conv``)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        if config.stem not in STEMS:
            raise ConfigError(f"model.encoder.stem: {config.stem!r} is not one of {list(STEMS)}")
        if config.stem != "patch" and not self.conv_stem:
            raise ConfigError(f"model.encoder.stem: the {config.kind!r} encoder has only its own patch embedding "
                              "(a 'conv' stem fits clip and siglip); leave stem: patch")
        if config.stem != "patch" and config.hf:  # refused before the tower is loaded
            raise ConfigError("model.encoder.stem: 'conv' replaces the patch embedding of a tower built from sizes; "
                              f"the pretrained tower {config.hf!r} keeps its own (stem: patch)")
        if config.resolution is not None and not self.interpolates:
            raise ConfigError(f"model.encoder.resolution: the {config.kind!r} encoder cannot interpolate its position "
                              f"embeddings (clip and siglip can); leave it unset")

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class _HFVisionTower(ImageEncoder):
    """A transformers vision tower, built from ``arch``, ``hf`` or the recipe's sizes."""

    model_cls: type
    config_cls: type
    model_types: tuple[str, ...]  # checkpoints this kind loads: the tower alone or the full model
    extra_config: dict = {}  # config fields a fresh (random) tower of this kind sets
    loader: type | None = None  # what loads an ``hf`` checkpoint (default: model_cls)

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config)
        if config.arch is not None and not (pretrained and config.hf):
            arch = config_from_arch(config.arch, key="model.encoder.arch")
            if not isinstance(arch, self.config_cls):
                raise ConfigError(f"model.encoder.arch: a {arch.model_type!r} tower, not one of kind {config.kind!r}")
            self.tower = self.model_cls._from_config(arch, dtype=torch_dtype(config.dtype))
        elif config.hf:
            self.tower = load_pretrained(self.loader or self.model_cls, config.hf, dtype=config.dtype,
                                         allow_custom_code=config.allow_custom_code, key="model.encoder.hf",
                                         model_types=self.model_types)
            config.arch = arch_of(self.tower.config)
            if config.preprocess == "hf" and config.processor is None:
                config.processor = pretrained_processor(config.hf)
        else:
            self.tower = self.model_cls._from_config(self._tiny_config(config), dtype=torch_dtype(config.dtype))
        if config.stem == "conv":
            self._conv_stem(config)
        self._geometry(config)

    def _conv_stem(self, config: EncoderConfig) -> None:
        """Replace the tower's patch embedding by ``ConvStem`` (same grid and width)."""
        embeddings = [m for m in self.tower.modules() if isinstance(getattr(m, "patch_embedding", None), nn.Conv2d)]
        if len(embeddings) != 1:
            raise ConfigError(f"model.encoder.stem: the {config.kind!r} tower has no single patch embedding to replace")
        patch = embeddings[0].patch_embedding
        embeddings[0].patch_embedding = ConvStem(patch.in_channels, patch.out_channels, patch.stride[0])

    def _geometry(self, config: EncoderConfig) -> None:
        """``out_dim``, ``image_size`` and ``grid`` of the built tower."""
        vision = self.tower.config
        self.out_dim = vision.hidden_size
        self.image_size = vision.image_size  # the tower's own: a pretrained one may differ from the recipe's
        if config.resolution is not None:
            self.image_size = self._resolution(config, vision.patch_size)
        side = self.image_size // vision.patch_size
        self.grid = (side, side)

    @staticmethod
    def _resolution(config: EncoderConfig, patch: int) -> int:
        """The letterbox side when the tower runs above its own size (checked against its patch)."""
        side = config.resolution
        if side < patch or side % patch:
            raise ConfigError(f"model.encoder.resolution: {side} is not a positive multiple of the tower's "
                              f"patch size {patch}")
        if config.preprocess != "letterbox":
            raise ConfigError("model.encoder.resolution: images are letterboxed at this size, but "
                              f"model.encoder.preprocess is {config.preprocess!r} (the checkpoint's processor "
                              "resizes to its own size); set preprocess: letterbox")
        return side

    def _tiny_config(self, c: EncoderConfig):
        return self.config_cls(
            image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size, **self.extra_config,
        )

    def forward(self, pixels: ImageBatch) -> torch.Tensor:
        values = pixels.pixel_values.to(self.tower.dtype)  # (I, 3, H, W)
        resized = {"interpolate_pos_encoding": True} if self.config.resolution is not None else {}
        out = self.tower(pixel_values=values, output_hidden_states=True, **resized)
        feats = out.hidden_states[self.config.feature_layer]  # (I, [1+] N, D)
        if self.has_cls and self.config.drop_cls:
            feats = feats[:, 1:]  # (I, N, D)
        return feats


@ENCODERS.register("siglip")
class SiglipEncoder(_HFVisionTower):
    config_cls, model_cls = SiglipVisionConfig, SiglipVisionModel
    model_types = ("siglip_vision_model", "siglip")
    interpolates = True
    conv_stem = True

    # A fresh tower has no use for the attention-pooling head: features are taken per patch.
    extra_config = {"vision_use_head": False}


@ENCODERS.register("clip")
class ClipEncoder(_HFVisionTower):
    config_cls, model_cls = CLIPVisionConfig, CLIPVisionModel
    model_types = ("clip_vision_model", "clip")
    interpolates = True
    conv_stem = True

    has_cls = True
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config, pretrained=pretrained)
        if not config.drop_cls:
            self.grid = (1, self.grid[0] * self.grid[1] + 1)  # CLS + patches as one row


@ENCODERS.register("janus")
class JanusEncoder(_HFVisionTower):
    """Janus's SigLIP-style tower (``JanusVisionModel``, what Janus reads pictures with). Its last
    layer (``feature_layer: -1``) is read after the tower's post-layernorm, as Janus reads it; an
    earlier layer, from the hidden states as for the other towers."""

    config_cls, model_cls = JanusVisionConfig, JanusVisionModel
    model_types = ("janus_vision_model",)

    def _tiny_config(self, c: EncoderConfig):
        return JanusVisionConfig(
            image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            mlp_ratio=c.intermediate_size / c.hidden_size,
        )

    def forward(self, pixels: ImageBatch) -> torch.Tensor:
        if self.config.feature_layer != -1:
            return super().forward(pixels)
        return self.tower(pixel_values=pixels.pixel_values.to(self.tower.dtype)).last_hidden_state  # (I, N, D)


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

    def forward(self, pixels: ImageBatch) -> torch.Tensor:
        values = pixels.pixel_values.to(self.tower.dtype)  # (I, tiles, 3, h, w)
        if values.dim() != 5:
            raise ConfigError("model.encoder: the mllama tower takes tiled images (set model.encoder.preprocess: hf)")
        out = self.tower(
            pixel_values=values[:, None], aspect_ratio_ids=pixels.extras["aspect_ratio_ids"][:, None],
            aspect_ratio_mask=pixels.extras["aspect_ratio_mask"][:, None],
        ).last_hidden_state  # (I, 1, tiles, P, D)
        return out.reshape(out.shape[0], -1, out.shape[-1])  # (I, tiles*P, D)


class _Qwen2VLVisionLoader:
    """Loads the Qwen2-VL vision tower from a tower checkpoint or from a full Qwen2-VL model (its
    ``visual`` part; the LLM's weights are left on disk). A tower weight the checkpoint lacks is an
    error, never a silent random init."""

    @staticmethod
    def from_pretrained(source: str, **kwargs):
        tower, info = Qwen2VisionTransformerPretrainedModel.from_pretrained(
            source, key_mapping={r"^model\.visual\.": "", r"^visual\.": ""}, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(f"it has no weights for {len(missing)} tower tensors, e.g. {missing[0]!r}")
        return tower


# What a recipe gives as model.encoder.processor to train a qwen2vl tower from scratch (patch_size,
# merge_size and temporal_patch_size may be left out: they are the tower's).
QWEN2VL_PROCESSOR_EXAMPLE = ("{image_processor_type: Qwen2VLImageProcessor, min_pixels: 1024, max_pixels: 8192, "
                             "merge_size: 2, temporal_patch_size: 2}")


@ENCODERS.register("qwen2vl")
class Qwen2VLEncoder(_HFVisionTower):
    """Qwen2-VL's vision transformer: native resolution, 2D rotary positions, 2x2 patch merging.

    Each image enters at its own size and aspect: transformers' Qwen2-VL image processor
    (``preprocess: hf``) only scales it into [min_pixels, max_pixels] and rounds its sides to
    ``patch_size * merge_size``, then cuts it into flat patches (N, C*T*p*p) in merge-block order,
    with its (t, h, w) patch grid. The ViT has no absolute position embedding (2D RoPE over the
    grid), attends within each image, and its merger MLP turns each 2x2 block of patches into one
    token: ``out_dim`` is the merger's output width, and an image of h x w patches gives
    (h/2) x (w/2) tokens. ``grid`` is that of a square ``image_size`` image (a letterboxed one
    with ``preprocess: letterbox``, which this tower also takes).

    A fresh (random) tower: ``hidden_size`` is the ViT's width and the merger's output,
    ``intermediate_size`` a whole multiple of it; the merge and temporal patch sizes are the
    processor settings' (default 2 and 2).
    """

    config_cls, model_cls = Qwen2VLVisionConfig, Qwen2VisionTransformerPretrainedModel
    model_types = ("qwen2_vl_vision", "qwen2_vl")
    loader = _Qwen2VLVisionLoader
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config, pretrained=pretrained)
        self._check_processor(config)

    def _geometry(self, config: EncoderConfig) -> None:
        vision = self.tower.config
        self.out_dim = vision.hidden_size  # the merger's output width
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        factor = self.patch * self.merge
        if config.image_size < factor or (config.preprocess == "letterbox" and config.image_size % factor):
            raise ConfigError(f"model.encoder.image_size: {config.image_size} is not a multiple of the qwen2vl "
                              f"tower's patch_size x merge_size = {factor}")
        self.image_size = config.image_size
        side = config.image_size // factor
        self.grid = (side, side)

    def _tiny_config(self, c: EncoderConfig):
        if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 4:
            raise ConfigError(f"model.encoder.num_heads: the qwen2vl tower's 2D rotary embedding needs "
                              f"hidden_size / num_heads to be a multiple of 4 (got {c.hidden_size} / {c.num_heads})")
        if c.intermediate_size % c.hidden_size:
            raise ConfigError(f"model.encoder.intermediate_size: the qwen2vl tower's MLP is a whole multiple of "
                              f"hidden_size {c.hidden_size} wide (got {c.intermediate_size})")
        settings = c.processor or {}
        for key in ("merge_size", "temporal_patch_size"):
            value = settings.get(key, 2)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.encoder.processor.{key}: expected a positive int, got {value!r}")
        return Qwen2VLVisionConfig(
            depth=c.num_layers, embed_dim=c.hidden_size, hidden_size=c.hidden_size, num_heads=c.num_heads,
            mlp_ratio=c.intermediate_size // c.hidden_size, patch_size=c.patch_size,
            spatial_merge_size=settings.get("merge_size", 2),
            temporal_patch_size=settings.get("temporal_patch_size", 2),
        )

    def _check_processor(self, config: EncoderConfig) -> None:
        """The image processor must cut images the way this tower reads them: its patch, merge and
        temporal patch sizes, when not given, are recorded from the tower; its pixel bounds are required."""
        if config.preprocess != "hf":
            return
        s = config.processor
        if not s:
            raise ConfigError("model.encoder.processor: the qwen2vl encoder with preprocess 'hf' needs the image "
                              f"processor's settings, e.g. {QWEN2VL_PROCESSOR_EXAMPLE}")
        name = s.get("image_processor_type")
        if not str(name).startswith("Qwen2VLImageProcessor"):
            raise ConfigError(f"model.encoder.processor.image_processor_type: {name!r}; the qwen2vl encoder takes "
                              "the flat patches of 'Qwen2VLImageProcessor'")
        for key, tower in (("patch_size", self.patch), ("merge_size", self.merge),
                           ("temporal_patch_size", self.temporal)):
            if key not in s:  # the tower's, recorded (transformers' own default would be Qwen2-VL's 14)
                s[key] = tower
            elif s[key] != tower:
                raise ConfigError(f"model.encoder.processor.{key}: {s[key]!r}, but the tower's is {tower}")
        size = s.get("size") or {}
        bounds = {}
        for key, alias in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = s.get(key, size.get(alias))
            if value is None:
                raise ConfigError(f"model.encoder.processor.{key}: missing (the pixel bounds images are scaled into)")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.encoder.processor.{key}: expected a positive int, got {value!r}")
            bounds[key] = value
        factor = self.patch * self.merge
        if bounds["max_pixels"] < factor * factor:
            raise ConfigError(f"model.encoder.processor.max_pixels: {bounds['max_pixels']} is less than one merged "
                              f"patch ({factor}x{factor} = {factor * factor} pixels)")
        if bounds["min_pixels"] > bounds["max_pixels"]:
            raise ConfigError(f"model.encoder.processor.min_pixels: {bounds['min_pixels']} is more than "
                              f"max_pixels {bounds['max_pixels']}")

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, C, H, W) same-size images -> flat patches (I*h*w, C*T*p*p) and grid_thw (I, 3), cut
        exactly as the Qwen2-VL image processor cuts them (merge blocks together, frames repeated)."""
        n, c, height, width = pixels.shape
        p, m, t = self.patch, self.merge, self.temporal
        if height % (p * m) or width % (p * m):
            raise ConfigError(f"model.encoder.image_size: {height}x{width} images are not a multiple of the qwen2vl "
                              f"tower's patch_size x merge_size = {p * m}")
        h, w = height // p, width // p
        x = pixels.reshape(n, c, h // m, m, p, w // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (I, h/m, w/m, m, m, C, p, p)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # (I, h/m, w/m, m, m, C, T, p, p)
        thw = torch.tensor([[1, h, w]] * n, device=pixels.device)
        return x.reshape(n * h * w, c * t * p * p), thw

    def forward(self, pixels: ImageBatch) -> torch.Tensor:
        x = pixels.pixel_values
        if x.dim() == 4:  # letterboxed (I, 3, H, W)
            x, thw = self.patchify(x)
        else:  # (ΣN, C*T*p*p): each image's own patches, in order
            thw = pixels.extras.get("grid_thw")  # (I, 3)
            if thw is None:
                raise ConfigError("model.encoder: the qwen2vl tower takes flat patches with their grid_thw "
                                  "(set model.encoder.preprocess: hf)")
        layer = self.config.feature_layer
        out = self.tower(x.to(self.tower.dtype), grid_thw=thw, output_hidden_states=layer != -1)
        merged = out.pooler_output if layer == -1 else self.tower.merger(out.hidden_states[layer])  # (ΣN', D)
        if merged.shape[0] != sum(pixels.token_counts()):
            raise ConfigError(f"model.encoder: the qwen2vl tower gave {merged.shape[0]} tokens for images whose grids "
                              f"{pixels.grids} say {sum(pixels.token_counts())}")
        return pixels.pad_tokens(merged)  # (I, N'_max, D), zero-padded


@ENCODERS.register("none")
class NoEncoder(ImageEncoder):
    """No encoder at all: the ``early`` fusion reads pictures as the image tokenizer's codes."""

    def __init__(self, config: EncoderConfig, *, pretrained: bool = True):
        super().__init__(config)
        self.out_dim, self.grid, self.image_size = 0, (0, 0), config.image_size

    def forward(self, pixels: ImageBatch) -> torch.Tensor:
        raise ConfigError("model.encoder.kind: 'none' reads no features (the early fusion writes pictures as codes)")


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

    def forward(self, pixels: ImageBatch) -> torch.Tensor:
        x = pixels.pixel_values
        if x.dim() == 2:  # (ΣN, p*p*3): patches of images of different sizes, in order
            return pixels.pad_tokens(x)  # (I, N_max, p*p*3)
        p = self.config.patch_size
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p)  # (I, C, rows, p, cols, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # (I, rows, cols, p, p, C)
        return x.reshape(n, (h // p) * (w // p), p * p * c)  # (I, N, p*p*3), row-major


def build_encoder(config: EncoderConfig, *, pretrained: bool = True) -> ImageEncoder:
    return ENCODERS.get(config.kind)(config, pretrained=pretrained)
