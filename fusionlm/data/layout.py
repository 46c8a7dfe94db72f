"""Which token ids stand for an image in the decoder sequence, by fusion design.

* ``unified``: one image token per connector output token;
* ``fuyu``: a row of image tokens then a newline token, for each row of patches;
* ``cross_attention``: a single marker (the image itself is reached through cross-attention).

The grid is per image: tiles and native sizes give different images different token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SampleError


@dataclass(frozen=True)
class GridRule:
    """How a connector maps an image's encoder grid to its output grid (plain data, so batches
    built in worker processes know token counts without the model).

    ``same``: unchanged (linear, MLP); ``fixed``: always ``value`` tokens, one row (Perceiver,
    Q-Former); ``pool``: pooled to about ``value`` tokens, aspect kept (average pooling,
    C-Abstractor); ``stride``: each side divided by ``value``, rounded up (2x2 merging).
    """

    kind: str = "same"
    value: int = 0

    def apply(self, grid: tuple[int, int]) -> tuple[int, int]:
        rows, cols = grid
        if self.kind == "fixed":
            return (1, self.value)
        if self.kind == "stride":
            return (math.ceil(rows / self.value), math.ceil(cols / self.value))
        if self.kind == "pool":
            if rows * cols <= self.value:
                return grid
            scale = math.sqrt(self.value / (rows * cols))
            return (max(1, round(rows * scale)), max(1, round(cols * scale)))
        return grid


@dataclass(frozen=True)
class SpecialIds:
    image: int
    newline: int
    pad: int
    end: int  # ends a turn: generation stops here
    tile_tags: tuple[tuple[int, ...], ...] = ()  # tiling with tags: ids of <tile_1>… then the thumbnail's


@dataclass(frozen=True)
class ImageLayout:
    fusion: str
    image_id: int
    newline_id: int
    rule: GridRule = GridRule()
    marker: str = "none"  # tiles: tags | newline | none (see TilingConfig)
    tags: tuple[tuple[int, ...], ...] = ()

    def grid(self, encoder_grid: tuple[int, int]) -> tuple[int, int]:
        """The connector's output grid for an image whose encoder grid is ``encoder_grid``."""
        return self.rule.apply(encoder_grid)

    def tokens(self, encoder_grid: tuple[int, int]) -> list[int]:
        """The token ids that stand for an image whose encoder grid is ``encoder_grid``."""
        rows, cols = self.grid(encoder_grid)
        if self.fusion == "cross_attention":
            return [self.image_id]
        if self.fusion == "fuyu":
            return ([self.image_id] * cols + [self.newline_id]) * rows
        return [self.image_id] * (rows * cols)

    def image_tokens(self, inputs: list) -> list[int]:
        """The token ids of one image from all its encoder inputs (``ImageInput``s: the image
        itself, or its tiles then its thumbnail).

        Method A: every input's tokens, each tile marked (tag before or newline after). Method B:
        one marker per input. Hybrid: only the thumbnail's tokens (tiles go through cross-attention).
        A video's frames (role ``frame``): one image's tokens per group of ``pool`` frames (the
        model averages each group into one image slot), unmarked.
        """
        if inputs and inputs[0].role == "frame":
            if self.fusion == "hybrid":
                raise SampleError("the hybrid fusion takes no video input (its sequence holds thumbnails only)")
            return [t for inp in inputs[::inputs[0].pool] for t in self.tokens(inp.grid)]
        if self.fusion == "hybrid":
            inputs = [inp for inp in inputs if inp.role == "thumbnail"]
        out: list[int] = []
        tiles = 0
        for inp in inputs:
            marked = inp.role != "image" and self.fusion != "cross_attention"
            if marked and self.marker == "tags":
                out.extend(self.tags[-1] if inp.role == "thumbnail" else self.tags[tiles])
            out.extend(self.tokens(inp.grid))
            if marked and self.marker == "newline":
                out.append(self.newline_id)
            tiles += inp.role == "tile"
        return out
