"""Which token ids stand for an image in the decoder sequence, by fusion design.

* ``unified``: one image token per connector output token;
* ``fuyu``: a row of image tokens then a newline token, for each row of patches;
* ``cross_attention``: a single marker (the image itself is reached through cross-attention).

The grid is per image: tiles and native sizes give different images different token counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialIds:
    image: int
    newline: int
    pad: int
    end: int  # ends a turn: generation stops here


@dataclass(frozen=True)
class ImageLayout:
    fusion: str
    image_id: int
    newline_id: int

    def tokens(self, grid: tuple[int, int]) -> list[int]:
        rows, cols = grid
        if self.fusion == "cross_attention":
            return [self.image_id]
        if self.fusion == "fuyu":
            return ([self.image_id] * cols + [self.newline_id]) * rows
        return [self.image_id] * (rows * cols)
