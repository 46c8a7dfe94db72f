"""The fusion designs: how a model's images reach its decoder, one class per design behind ``DESIGNS``.

* ``unified`` (Method A: LLaVA, Molmo, Qwen2-VL, NVLM-D): connector outputs replace the embeddings
  of the image tokens, one token per output;
* ``fuyu``: the same with no encoder (raw patches), each row of patches closed by a newline token;
* ``cross_attention`` (Method B: Flamingo, Llama 3.2 Vision, NVLM-X): one marker token per image,
  the image reached through gated cross-attention before every Nth decoder layer;
* ``hybrid`` (NVLM-H): the thumbnail in the sequence, the tiles through cross-attention;
* ``early`` (Chameleon, Emu3): no encoder; a picture is written as the image tokenizer's codes, as
  a drawn one is (``<begin_of_image>``, codes, ``<end_of_image>``), embedded by the generation
  design and never a target where it is read.

A design says how an image is written into the sequence (``sequence``, plain data that batches
built in worker processes read), checks its own config (``check``) and turns the connector's
outputs into what the decoder sees (``context``). Adding a design is one registered class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from .data.layout import SequenceRule
from .errors import ConfigError, SampleError
from .fusion import CrossInputs, ImageContext, image_memory
from .registry import Registry

if TYPE_CHECKING:  # names for annotations only; the model (model.FusionLM) is passed in, never imported
    from torch.nn import Module as FusionLM

    from .config.schema import RecipeConfig
    from .data.pixels.processing import ImageBatch

DESIGNS: Registry[type["Design"]] = Registry("fusion", "model.fusion.kind")


class Design:
    """One way for images to reach the decoder (subclasses are stateless)."""

    name: ClassVar[str]
    sequence: ClassVar[SequenceRule]
    cross: ClassVar[bool] = False  # gated cross-attention blocks run before decoder layers
    native_layers: ClassVar[bool] = False  # fits an LLM with cross-attention layers of its own (Mllama)
    raw_patches: ClassVar[bool] = False  # takes the ``patches`` encoder (no vision tower), and only it does
    reads_codes: ClassVar[bool] = False  # reads pictures as codes (no encoder, no connector), and only it does

    def check(self, config: "RecipeConfig") -> None:
        """This design's rules for ``config``; a ``ConfigError`` names the key at fault."""
        enc = config.model.encoder
        if self.raw_patches != (enc.kind == "patches"):
            raise ConfigError(
                "model.encoder.kind: the fuyu fusion takes raw patches and only it does: "
                f"use encoder kind 'patches' with fusion 'fuyu' (got {enc.kind!r} with {self.name!r})"
            )
        if self.reads_codes != (enc.kind == "none"):
            raise ConfigError(f"model.encoder.kind: the early fusion reads pictures as codes and only it has no "
                              f"encoder: use encoder kind 'none' with fusion 'early' (got {enc.kind!r} with {self.name!r})")
        if self.reads_codes != (config.model.connector.kind == "none"):
            raise ConfigError(f"model.connector.kind: the early fusion has no connector and only it: use connector "
                              f"kind 'none' with fusion 'early' (got {config.model.connector.kind!r} with {self.name!r})")

    def context(self, model: "FusionLM", pixels: "ImageBatch", features: torch.Tensor, counts: list[int],
                input_ids: torch.Tensor) -> ImageContext:
        """What the decoder needs from the connector outputs ``features`` (I, N, D) of ``pixels``, of
        which image i has ``counts[i]`` real tokens, for the sequences ``input_ids`` (B, T)."""
        raise NotImplementedError


@DESIGNS.register("unified")
class Unified(Design):
    name = "unified"
    sequence = SequenceRule("unified", per_image="grid")

    def context(self, model, pixels, features, counts, input_ids) -> ImageContext:
        if any(c != features.shape[1] for c in counts):  # images of different sizes, zero-padded: real tokens only
            features = torch.cat([f[:c] for f, c in zip(features, counts)])[None]  # (1, ΣN, D)
        return ImageContext(features=features)


@DESIGNS.register("fuyu")
class Fuyu(Unified):
    name = "fuyu"
    sequence = SequenceRule("fuyu", per_image="rows")
    raw_patches = True


@DESIGNS.register("early")
class Early(Design):
    name = "early"
    sequence = SequenceRule("early", per_image="codes")
    reads_codes = True

    def check(self, config) -> None:
        super().check(config)
        if config.model.generation.kind == "none":
            raise ConfigError("model.generation.kind: the early fusion reads pictures as the codes a model draws in; "
                              "set a generation that draws (shared, as Chameleon and Emu3, or decoupled)")

    def context(self, model, pixels, features, counts, input_ids) -> ImageContext:
        raise SampleError("the early fusion reads pictures as codes, not as encoder features")


@DESIGNS.register("cross_attention")
class CrossAttention(Design):
    name = "cross_attention"
    sequence = SequenceRule("cross_attention", per_image="marker")
    cross = True
    native_layers = True

    def context(self, model, pixels, features, counts, input_ids) -> ImageContext:
        markers = input_ids == model.ids.image  # (B, T)
        valid, pad = self._tile_slots(model, pixels, features, markers)
        if valid is None and any(c != features.shape[1] for c in counts):  # padding tokens are never visible
            valid = torch.arange(features.shape[1], device=features.device)[None] < torch.tensor(
                counts, device=features.device)[:, None]  # (I, N)
        cross = image_memory(features, markers, visibility=model.config.fusion.visibility, valid=valid, pad=pad)
        return ImageContext(cross=project(model, cross))

    @staticmethod
    def _tile_slots(model, pixels, features: torch.Tensor, markers: torch.Tensor):
        """Tiled images: which tokens are real tiles, and what fills a row's missing images.

        Like transformers' Mllama, a missing image is the encoding of a blank one (it is never
        visible, but a text row that sees no image attends to every slot).
        """
        mask = pixels.extras.get("aspect_ratio_mask")  # (I, tiles)
        if mask is None:
            return None, None
        if pixels.pools:  # pooled video frames: one mask per slot (a group's frames share one size)
            mask = mask[pixels.heads()]
        per_tile = features.shape[1] // mask.shape[1]
        valid = mask.bool().repeat_interleave(per_tile, dim=1)  # (I, tiles*P)
        counts = markers.sum(1)
        if bool((counts == counts.max()).all()):
            return valid, None
        blank_mask = torch.zeros_like(mask[:1])
        blank_mask[:, 0] = 1
        blank = type(pixels)(torch.zeros_like(pixels.pixel_values[:1]), pixels.grids[:1],
                             {"aspect_ratio_ids": torch.zeros_like(pixels.extras["aspect_ratio_ids"][:1]),
                              "aspect_ratio_mask": blank_mask})
        return valid, model.image_features(blank)[0]  # (tiles*P, D)


@DESIGNS.register("hybrid")
class Hybrid(Design):
    name = "hybrid"
    sequence = SequenceRule("hybrid", per_image="grid", only="thumbnail")
    cross = True

    def check(self, config) -> None:
        super().check(config)
        tiling = config.model.tiling
        if not (tiling.max_tiles and tiling.thumbnail and tiling.thumbnail_from == 1):
            raise ConfigError("model.fusion.kind: hybrid puts the thumbnail in the sequence and the tiles in "
                              "cross-attention; set model.tiling.max_tiles >= 1 with thumbnail: true and "
                              "thumbnail_from: 1")

    def context(self, model, pixels, features, counts, input_ids) -> ImageContext:
        """Each image's thumbnail tokens go into the sequence (as in Method A); its tiles are reached
        through the gated cross-attention, visible from the thumbnail's first token on."""
        thumbs = [i for i, role in enumerate(pixels.roles) if role == "thumbnail"]
        if len(thumbs) != len(pixels.roles) - pixels.roles.count("tile"):
            raise SampleError("hybrid fusion needs every image as tiles followed by a thumbnail")
        starts = [0] + [t + 1 for t in thumbs[:-1]]
        thumb = torch.cat([features[t, : counts[t]] for t in thumbs])[None]  # (1, ΣN_thumb, D)
        tiles = [torch.cat([features[i, : counts[i]] for i in range(s, t)]) for s, t in zip(starts, thumbs)]
        width = max(len(x) for x in tiles)
        memory = features.new_zeros(len(tiles), width, features.shape[-1])  # (J, M, D)
        valid = torch.zeros(len(tiles), width, dtype=torch.bool, device=features.device)  # (J, M)
        for j, x in enumerate(tiles):
            memory[j, : len(x)], valid[j, : len(x)] = x, True
        # the marker of image j: the first of its thumbnail tokens
        positions = (input_ids == model.ids.image).flatten().nonzero().squeeze(1)  # (ΣN_thumb,)
        if positions.numel() != thumb.shape[1]:
            raise SampleError(f"the batch has {positions.numel()} image-token positions but its {len(thumbs)} "
                              f"thumbnails give {thumb.shape[1]} tokens")
        first = torch.tensor([0] + [counts[t] for t in thumbs[:-1]], device=positions.device).cumsum(0)
        markers = torch.zeros_like(input_ids, dtype=torch.bool).flatten()
        markers[positions[first]] = True
        cross = image_memory(memory, markers.view_as(input_ids), visibility=model.config.fusion.visibility,
                             valid=valid)
        return ImageContext(features=thumb, cross=project(model, cross))


def project(model: "FusionLM", cross: CrossInputs) -> CrossInputs:
    """``cross`` with each gated block's image keys/values, projected once per request (an LLM with
    cross-attention layers of its own projects them itself, from ``cross.memory``)."""
    cross.kv = {int(i): block.project_kv(cross.memory) for i, block in model.cross_blocks.items()}
    return cross


def design_of(fusion_kind: str) -> Design:
    """The design that ``model.fusion.kind`` names (a ``ConfigError`` listing the known ones if none)."""
    return DESIGNS.get(fusion_kind)()
