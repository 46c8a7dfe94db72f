"""Images -> encoder inputs: one ``ImageInput`` per image, ``ImageBatch`` per batch.

Every image goes through the one loader (``images.load_image``: checks, limits, RGB). Then either
fusionlm's own ``letterbox`` (square, padded, the synthetic world's default) or the checkpoint's
own transformers image processor (``hf``: resize, crop, normalisation, tiling exactly as that
model was trained), run on its Pillow backend. An image's token grid travels with its pixels,
since with tiles or native sizes (Fuyu) it differs from image to image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError, ImageError
from .images import DEFAULT_MAX_PIXELS, fit_square, load_image, to_pixels
from .tiling import cut_tiles, tile_grid
from .video import DEFAULT_MAX_VIDEO_PIXELS, Video, frame_sources


@dataclass
class ImageInput:
    """One image ready for its encoder.

    Attributes:
        pixels: (3, H, W); (tiles, 3, h, w) for a tiled tower; (N, p*p*3) patches for Fuyu.
        grid: (rows, cols) of the encoder's output tokens for this image.
        extras: other per-image inputs of the encoder (e.g. ``aspect_ratio_ids``).
        role: ``image``; or, for a tiled image, ``tile`` / ``thumbnail`` (its tiles come first,
            then its thumbnail); ``frame`` for a video's sampled frame.
        pool: video frames: how many consecutive frames (``model.video.temporal_pool``) the model
            averages into one image slot, after the connector; 1 for everything else.
    """

    pixels: torch.Tensor
    grid: tuple[int, int]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    role: str = "image"
    pool: int = 1


@dataclass
class ImageBatch:
    """The images of a batch, in the order of their placeholders (row-major over the batch)."""

    pixel_values: torch.Tensor  # stacked (I, ...) or, for patch lists, concatenated (ΣN, p*p*3)
    grids: list[tuple[int, int]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # each (I, ...)
    roles: list[str] = field(default_factory=list)  # each input's role (empty: all whole images)
    pools: list[int] = field(default_factory=list)  # each input's ImageInput.pool (empty: all 1)

    def __len__(self) -> int:
        return len(self.grids)

    def groups(self) -> list[int]:
        """Sizes of the runs of consecutive inputs that become one image slot of the decoder: 1
        each, except video frames pooled ``temporal_pool`` at a time (a clip's frames are
        consecutive and their number is a multiple of it)."""
        if not self.pools:
            return [1] * len(self.grids)
        sizes, i = [], 0
        while i < len(self.pools):
            g = self.pools[i]
            run = slice(i, i + g)
            if g < 1 or i + g > len(self.pools) or set(self.pools[run]) != {g} or len(set(self.grids[run])) != 1:
                raise ValueError(f"ImageBatch: inputs {i}..{i + g - 1} do not form one pooled group of {g} "
                                 f"frames of one size (pools {self.pools}, grids {self.grids})")
            sizes.append(g)
            i += g
        return sizes

    def heads(self) -> list[int]:
        """Index of the first input of each image slot (all of them without pooling)."""
        sizes = self.groups()
        return [sum(sizes[:k]) for k in range(len(sizes))]

    @property
    def slot_grids(self) -> list[tuple[int, int]]:
        """The encoder grid of each image slot (a pooled group's frames share one)."""
        return self.grids if not self.pools else [self.grids[i] for i in self.heads()]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(I, N, D) features of the inputs -> (S, N, D), one per slot: each group's mean."""
        if not self.pools or all(p == 1 for p in self.pools):
            return features
        return torch.stack([part.mean(0) for part in features.split(self.groups())])  # (S, N, D)

    def distinct(self) -> "tuple[ImageBatch, torch.Tensor] | None":
        """The batch's distinct inputs, each once (in order of first appearance), and (I,) the index
        among them of each input; None when no input repeats another, or when inputs are not stacked
        whole images of one role (patch lists, extras, pooled frames: left as they are)."""
        values = self.pixel_values
        if len(self) < 2 or values.dim() != 4 or self.extras or any(p != 1 for p in self.pools) \
                or len(set(self.roles)) > 1:
            return None
        flat = values.flatten(1)  # (I, P)
        if len(torch.unique(flat.sum(1))) == len(self):  # distinct sums, distinct images: the usual batch
            return None
        _, inverse = torch.unique(flat, dim=0, return_inverse=True)  # (I,)
        count = int(inverse.max()) + 1
        if count == len(self):
            return None
        at = torch.arange(len(self), device=inverse.device)
        first = torch.full((count,), len(self), device=inverse.device).scatter_reduce(0, inverse, at, "amin")
        first = first.sort().values  # (U,) the first input showing each distinct image, in order
        index = torch.empty(count, dtype=torch.long, device=inverse.device)
        index[inverse[first]] = torch.arange(count, device=inverse.device)
        keep = first.tolist()
        return ImageBatch(values[first], [self.grids[i] for i in keep], {}, [self.roles[i] for i in keep]
                          if self.roles else [], [1] * count if self.pools else []), index[inverse]

    @classmethod
    def collate(cls, inputs: list[ImageInput]) -> "ImageBatch | None":
        if not inputs:
            return None
        grids = [inp.grid for inp in inputs]
        extras = {k: torch.stack([inp.extras[k] for inp in inputs]) for k in inputs[0].extras}
        roles = [inp.role for inp in inputs] if any(inp.role != "image" for inp in inputs) else []
        pools = [inp.pool for inp in inputs] if any(inp.pool != 1 for inp in inputs) else []
        if inputs[0].pixels.dim() == 2:  # patch lists of different lengths
            return cls(torch.cat([inp.pixels for inp in inputs]), grids, extras, roles, pools)
        return cls(torch.stack([inp.pixels for inp in inputs]), grids, extras, roles, pools)

    @classmethod
    def of(cls, pixel_values: torch.Tensor, grid: tuple[int, int]) -> "ImageBatch":
        """Images of one fixed size, each giving ``grid`` tokens."""
        return cls(pixel_values, [grid] * pixel_values.shape[0])

    def token_counts(self) -> list[int]:
        return [r * c for r, c in self.grids]

    def pad_tokens(self, flat: torch.Tensor) -> torch.Tensor:
        """(ΣN, D) tokens of images in order -> (I, N_max, D), zero-padded."""
        counts = self.token_counts()
        out = flat.new_zeros(len(counts), max(counts), flat.shape[-1])  # (I, N_max, D)
        for i, part in enumerate(flat.split(counts)):
            out[i, : part.shape[0]] = part
        return out

    def to(self, device: torch.device | str) -> "ImageBatch":
        return ImageBatch(self.pixel_values.to(device), self.grids, {k: v.to(device) for k, v in self.extras.items()},
                          self.roles, self.pools)


def hf_image_processor(settings: dict[str, Any]):
    """A transformers image processor (its Pillow backend) from its saved settings."""
    import transformers

    name = settings.get("image_processor_type")
    if not name:
        raise ConfigError("model.encoder.processor: no image_processor_type in the processor settings")
    base = name.removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, f"{base}Pil", None) or getattr(transformers, base, None)
    if cls is None:
        raise ConfigError(f"model.encoder.processor: transformers has no image processor {name!r}")
    return cls.from_dict({k: v for k, v in settings.items() if k != "image_processor_type"})


def pretrained_processor(source: str) -> dict[str, Any]:
    """The settings of a checkpoint's own image processor (a directory or a hub id)."""
    from transformers import AutoImageProcessor

    try:
        return processor_settings(AutoImageProcessor.from_pretrained(source, backend="pil"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.encoder.preprocess: {source!r} has no image processor to use "
                          f"({str(exc).splitlines()[0]}); use preprocess: letterbox") from None


def processor_settings(processor) -> dict[str, Any]:
    """What the recipe records of an image processor: its JSON settings (YAML-safe)."""
    return json.loads(processor.to_json_string())


@dataclass
class ImageSpec:
    """How images become encoder inputs for one model."""

    size: int  # letterbox: the square side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    root: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    grid: tuple[int, int] | None = None  # the encoder's token grid for a fixed-size image
    hf: Any = None  # a transformers image processor; None: letterbox
    tiling: Any = None  # a TilingConfig with max_tiles >= 1: images are cut into tiles (+ thumbnail)
    frames: int = 8  # a video is sampled to this many frames (model.video.frames)
    temporal_pool: int = 1  # ... whose features are averaged this many at a time (model.video.temporal_pool)
    max_video_pixels: int | None = DEFAULT_MAX_VIDEO_PIXELS  # decoded pixels of one animated clip (all frames)

    @classmethod
    def for_model(cls, model, config, *, root: str | None = None) -> "ImageSpec":
        """The spec of a built model (its encoder's size, statistics, processor, tiling and video
        settings, all read off ``model.config``) under the limits of the recipe's ``config.data``."""
        enc, settled = model.config.encoder, model.config
        hf = None
        if enc.preprocess == "hf":
            if not enc.processor:
                raise ConfigError("model.encoder.processor: preprocess is 'hf' but no processor settings are recorded")
            hf = hf_image_processor(enc.processor)
        tiling = settled.tiling if settled.tiling.max_tiles else None
        return cls(size=model.encoder.image_size, mean=model.encoder.mean, std=model.encoder.std, root=root,
                   max_pixels=config.data.max_image_pixels, grid=model.encoder.grid, hf=hf, tiling=tiling,
                   frames=settled.video.frames, temporal_pool=settled.video.temporal_pool,
                   max_video_pixels=config.data.max_video_pixels)

    def pixels(self, source: Any) -> torch.Tensor:
        return self.process(source).pixels

    def process_all(self, source: Any) -> list[ImageInput]:
        """All encoder inputs of one image: itself; or, when tiling, its tiles then its thumbnail.

        A ``Video``: its ``frames`` sampled frames, each through ``process`` (the image path; frames
        are never tiled), with role ``frame`` and ``pool = temporal_pool``.
        """
        if isinstance(source, Video):
            if self.frames < 1 or self.temporal_pool < 1 or self.frames % self.temporal_pool:
                raise ConfigError(f"model.video.temporal_pool: {self.temporal_pool} does not divide "
                                  f"model.video.frames {self.frames}")
            frames = frame_sources(source, self.frames, root=self.root, max_pixels=self.max_pixels,
                                   max_video_pixels=self.max_video_pixels)
            return [replace(self.process(f), role="frame", pool=self.temporal_pool) for f in frames]
        if self.tiling is None:
            return [self.process(source)]
        img = load_image(source, root=self.root, max_pixels=self.max_pixels)
        t = self.tiling
        grid = tile_grid(img.width, img.height, max_tiles=t.max_tiles, min_tiles=t.min_tiles, tile=self.size)
        if t.thumbnail and grid == (1, 1) and t.thumbnail_from > 1:
            return [self._from_image(img)]  # fits one tile: the image itself, once
        inputs = [replace(self._from_image(tile), role="tile") for tile in cut_tiles(img, grid, self.size)]
        if t.thumbnail:
            inputs.append(replace(self._from_image(img), role="thumbnail"))
        return inputs

    def process(self, source: Any) -> ImageInput:
        """One image as one encoder input (no tiling)."""
        return self._from_image(load_image(source, root=self.root, max_pixels=self.max_pixels))

    def _from_image(self, img) -> ImageInput:
        if self.hf is None:
            return ImageInput(to_pixels(fit_square(img, self.size), self.size, mean=self.mean, std=self.std),
                              self._grid())
        kind = type(self.hf).__name__
        if kind.startswith("Mllama"):
            return self._mllama(img)
        if kind.startswith("Fuyu"):
            return self._fuyu(img)
        if kind.startswith("Qwen2VL"):
            return self._qwen2vl(img)
        out = self.hf(images=[img], return_tensors="pt")
        return ImageInput(out["pixel_values"][0], self._grid())  # (3, H, W)

    def _grid(self) -> tuple[int, int]:
        if self.grid is None:
            raise ConfigError("ImageSpec: no token grid (build it with ImageSpec.for_model)")
        return self.grid

    def _mllama(self, img) -> ImageInput:
        out = self.hf(images=[[img]], return_tensors="pt")
        return ImageInput(
            out["pixel_values"][0, 0],  # (tiles, 3, h, w), padded to the maximum number of tiles
            self._grid(),
            {"aspect_ratio_ids": out["aspect_ratio_ids"][0, 0], "aspect_ratio_mask": out["aspect_ratio_mask"][0, 0]},
        )

    def _qwen2vl(self, img) -> ImageInput:
        """Qwen2-VL: the image at its own size and aspect (only scaled into [min_pixels, max_pixels],
        sides rounded to patch*merge), as flat patches (N, C*T*p*p) in merge-block order; its grid is
        the tower's output after merging, (h/merge, w/merge) for an image of h x w patches."""
        try:
            out = self.hf(images=[img], return_tensors="pt")
        except ValueError as exc:  # e.g. an aspect ratio over 200
            raise ImageError(f"image of {img.width}x{img.height}: {str(exc).splitlines()[0]}") from None
        thw = out["image_grid_thw"][0]  # (3,): frames, rows, cols of patches
        m = self.hf.merge_size
        return ImageInput(out["pixel_values"], (int(thw[1]) // m, int(thw[2]) // m), {"grid_thw": thw})

    def _fuyu(self, img) -> ImageInput:
        """Fuyu: fit into the canvas, pad, keep only the patches that cover the image itself."""
        out = self.hf(images=[img])
        image = np.asarray(out["images"][0][0])  # (3, H_canvas, W_canvas), normalised
        p = self.hf.patch_size
        ph, pw = (p["height"], p["width"]) if isinstance(p, dict) else (p.height, p.width)
        h = min(image.shape[-2], math.ceil(int(out["image_unpadded_heights"][0][0]) / ph) * ph)
        w = min(image.shape[-1], math.ceil(int(out["image_unpadded_widths"][0][0]) / pw) * pw)
        patches = self.hf.patchify_image(image[:, :h, :w])  # (N, ph*pw*3), row-major
        return ImageInput(torch.as_tensor(np.ascontiguousarray(patches), dtype=torch.float32), (h // ph, w // pw))
