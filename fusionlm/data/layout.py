"""Which token ids stand for an image in the decoder sequence.

Each fusion design (``fusionlm.designs``) says how it writes an image (a ``SequenceRule``) and
each connector how many tokens an encoder grid becomes (a ``GridRule``); both are plain data, so
batches built in worker processes know the token counts without the model. The grid is per
image: tiles and native sizes give different images different token counts.
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
class SequenceRule:
    """How a fusion design writes one image into the decoder sequence.

    ``per_image``: ``grid``, one image token per connector output token (Method A); ``rows``, a
    row of image tokens then a newline token for each row of patches (Fuyu); ``marker``, a single
    marker token (Method B: the image itself is reached through cross-attention); ``codes``, the
    image tokenizer's codes as a drawn picture is written (early fusion: ``PromptEncoder`` writes
    them with the model's ``DrawLayout``, not with this layout). ``only``: the
    role of the encoder inputs that the sequence holds (the hybrid's ``thumbnail``: its tiles go
    through cross-attention); None: all of them. ``design``: the design's name, for messages.
    """

    design: str
    per_image: str = "grid"
    only: str | None = None

    @property
    def newline(self) -> bool:
        """Whether the newline token is part of every image."""
        return self.per_image == "rows"


@dataclass(frozen=True)
class SpecialIds:
    image: int
    newline: int
    pad: int
    end: int  # ends a turn: generation stops here
    tile_tags: tuple[tuple[int, ...], ...] = ()  # tiling with tags: ids of <tile_1>… then the thumbnail's
    # a model that draws (model.generation): ids of <begin_of_image>, <end_of_image>, <image_code>; -1: none
    begin_image: int = -1
    end_image: int = -1
    code: int = -1
    row_end: int = -1  # ends each row of a drawn image's codes (Emu3); -1: none
    header: int = -1  # before the first code (Emu3's <|image token|>); -1: none
    frame_end: int = -1  # after the last row (Emu3's <|extra_201|>); -1: none
    size_text: tuple[int, ...] = ()  # the grid as text after the begin token (Emu3's "4*4"); (): none
    # around each image a prompt shows (model.tokenizer.image_begin / image_end); -1: none
    image_begin: int = -1
    image_end: int = -1
    bos: int = -1  # the tokenizer's beginning of sequence; -1: it has none


@dataclass(frozen=True)
class ImageLayout:
    sequence: SequenceRule
    image_id: int
    newline_id: int
    rule: GridRule = GridRule()
    marker: str = "none"  # tiles: tags | newline | none (see TilingConfig)
    tags: tuple[tuple[int, ...], ...] = ()
    bracket: tuple[int, int] | None = None  # (begin, end) ids around each image's tokens; None: none

    def grid(self, encoder_grid: tuple[int, int]) -> tuple[int, int]:
        """The connector's output grid for an image whose encoder grid is ``encoder_grid``."""
        return self.rule.apply(encoder_grid)

    def tokens(self, encoder_grid: tuple[int, int]) -> list[int]:
        """The token ids that stand for an image whose encoder grid is ``encoder_grid``."""
        rows, cols = self.grid(encoder_grid)
        if self.sequence.per_image == "marker":
            return [self.image_id]
        if self.sequence.per_image == "rows":
            return ([self.image_id] * cols + [self.newline_id]) * rows
        return [self.image_id] * (rows * cols)

    def image_tokens(self, inputs: list) -> list[int]:
        """The token ids of one image from all its encoder inputs (``ImageInput``s: the image
        itself, or its tiles then its thumbnail).

        Method A: every input's tokens, each tile marked (tag before or newline after). Method B:
        one marker per input. Hybrid (``only``): only the thumbnail's tokens (tiles go through
        cross-attention). A ``bracket`` encloses the whole image (every input).
        A video's frames (role ``frame``): one image's tokens per group of ``pool`` frames (the
        model averages each group into one image slot), unmarked.
        """
        only = self.sequence.only
        if inputs and inputs[0].role == "frame":
            if only is not None:
                raise SampleError(f"the {self.sequence.design} fusion takes no video input "
                                  f"(its sequence holds {only}s only)")
            return [t for inp in inputs[::inputs[0].pool] for t in self.tokens(inp.grid)]
        if only is not None:
            inputs = [inp for inp in inputs if inp.role == only]
        out: list[int] = []
        tiles = 0
        for inp in inputs:
            marked = inp.role != "image" and self.sequence.per_image != "marker"
            if marked and self.marker == "tags":
                out.extend(self.tags[-1] if inp.role == "thumbnail" else self.tags[tiles])
            out.extend(self.tokens(inp.grid))
            if marked and self.marker == "newline":
                out.append(self.newline_id)
            tiles += inp.role == "tile"
        return [self.bracket[0], *out, self.bracket[1]] if self.bracket else out
