"""Images a model draws, as data: which pictures of a sample are drawn, how one is written into the
sequence, and the null prompt that condition dropout trains and guidance samples against.

A picture whose ``<image>`` placeholder sits in an assistant turn is one the assistant draws (a
text-to-image answer, or an image in the middle of an any-to-any reply); one in any other turn is
read. A drawn picture becomes ``<begin_of_image>``, one ``<image_code>`` per code of the image
tokenizer's grid (each row closed by an end-of-row token where ``model.generation.row_end_token``
is set, as in Emu3), ``<end_of_image>``, all of it trained; the model puts the picture's codes in
place of the ``<image_code>`` positions (``FusionLM.with_codes``). Emu3 writes more around the
codes: a header (the grid as text, ``4*4``, and ``<|image token|>``) after the begin token and an
end of frame before the end token (``model.generation.size_header`` / ``header_token`` /
``frame_end_token``); a sampler writes those, as it writes the row ends, and chooses the codes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config.schema import NULL_PROMPTS
from ..errors import ConfigError, SampleError
from .chat import IGNORE, PLACEHOLDERS
from .pixels.video import Video
from .pixels.images import DEFAULT_MAX_PIXELS, image_to_pixels
from .sample import Sample

HALF = (0.5, 0.5, 0.5)  # a drawn picture's pixels are in [-1, 1]


def drawn_items(sample: Sample) -> list[bool]:
    """For each item of ``sample.images``, in order: whether its placeholder is in an assistant turn."""
    if sample.kind == "document":
        return [False] * len(sample.images)
    return [m["role"] == "assistant" for m in sample.messages for _ in PLACEHOLDERS.findall(m["content"])]


def draws_pictures(sample: Sample) -> bool:
    return any(drawn_items(sample))


def null_prompt(sample: Sample, style: str = "text_removed") -> Sample:
    """``sample`` as its unconditional prompt. Condition dropout trains on it and classifier-free
    guidance samples its null rows from it, so the two are the same sequence by construction.

    ``text_removed``: the text of its non-assistant turns removed (the pictures they show stay).
    ``padded``: the sample as it is, marked ``null``; ``PromptEncoder`` pads its tokens
    (``DrawLayout.padded``)."""
    out = copy.copy(sample)
    out.null = True
    if style == "text_removed":
        out.messages = [m if m["role"] == "assistant" else
                        {**m, "content": "".join(PLACEHOLDERS.findall(m["content"]))} for m in sample.messages]
    elif style != "padded":
        raise ConfigError(f"model.generation.null_prompt: unknown {style!r} (known: {', '.join(NULL_PROMPTS)})")
    return out


@dataclass(frozen=True)
class DrawLayout:
    """How a model writes one drawn image: its token ids and the picture size its tokenizer reads."""

    begin: int
    end: int
    code: int
    grid: tuple[int, int]  # codes per image (rows, columns)
    image_size: int
    row_end: int = -1  # Emu3: the token after each row of codes; -1: none
    null: str = "text_removed"  # model.generation.null_prompt
    keep: tuple[int, ...] = ()  # padded null prompts: the ids left as they are (BOS, <begin_of_image>)
    pad: int = 0
    header: tuple[int, ...] = ()  # Emu3: the ids between the begin token and the first code
    footer: tuple[int, ...] = ()  # Emu3: the ids between the last row and the end token
    mask: int = -1  # the masked design (Show-o): the [MASK] code's id; -1: codes are never masked
    noised: bool = False  # the diffusion design (Transfusion): each drawn picture trains at a noise level of its own

    @property
    def codes(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def opening(self) -> list[int]:
        """What opens a picture, before its first code: ``<begin_of_image>`` and any header."""
        return [self.begin, *self.header]

    @property
    def written(self) -> int:
        """Positions a sampler writes after the opening and before ``<end_of_image>``: the codes,
        any row ends and any footer."""
        return len(self.tokens()) - len(self.opening) - 1

    def tokens(self) -> list[int]:
        """One picture's ids, ``<image_code>`` in place of each code."""
        rows, cols = self.grid
        row = [self.code] * cols + ([self.row_end] if self.row_end >= 0 else [])
        return [*self.opening, *row * rows, *self.footer, self.end]

    def padded(self, ids: list[int]) -> list[int]:
        """A ``padded`` null prompt's ids (Janus): every token before the first drawn picture's
        opening that is not BOS or ``<begin_of_image>`` becomes the padding token; the rest stays."""
        end = ids.index(self.code) - len(self.header) if self.code in ids else len(ids)
        return [t if t in self.keep else self.pad for t in ids[:end]] + ids[end:]

    def masked(self, ids: list[int], labels: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """A training sample of the masked design: in each drawn picture (a run of ``<image_code>``
        targets) a share ``cos(pi/2 u)``, u ~ U(0, 1), of the codes, at least one (MaskGIT's and Show-o's
        schedule), becomes ``[MASK]`` and stays a target; the others are read and not learnt.
        Decided by ``rng``, the sample's own, so a sample is masked alike on any number of processes."""
        ids, labels = list(ids), list(labels)
        runs, run = [], []
        for i, label in enumerate(labels + [None]):
            if label == self.code:
                run.append(i)
            elif run:
                runs.append(run)
                run = []
        for run in runs:
            n = max(1, math.ceil(math.cos(math.pi / 2 * rng.random()) * len(run)))
            hidden = set(rng.permutation(run)[:n].tolist())
            for i in run:
                if i in hidden:
                    ids[i] = self.mask
                else:
                    labels[i] = IGNORE
        return ids, labels

    def noise(self, pictures: int, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[float]]:
        """A training sample of the diffusion design: for each of its drawn pictures, gaussian noise
        (3, S, S) and a noise level t ~ U(0, 1) (flow matching's), drawn by ``rng``, the sample's own."""
        noise, times = [], []
        for _ in range(pictures):
            times.append(float(rng.random()))
            noise.append(torch.from_numpy(rng.standard_normal((3, self.image_size, self.image_size)).astype(np.float32)))
        return noise, times

    def pixels(self, source, *, root=None, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """A drawn picture (a PIL image or a path) as the tokenizer reads it: (3, S, S) in [-1, 1],
        through the one image loader (letterboxed when not square)."""
        if isinstance(source, Video):
            raise SampleError("a video in an assistant turn: a model draws pictures, not clips")
        return image_to_pixels(source, self.image_size, mean=HALF, std=HALF, root=root, max_pixels=max_pixels)

    @classmethod
    def of(cls, model) -> "DrawLayout | None":
        """The layout of a built model (None: it does not draw)."""
        if not model.draws:
            return None
        tok = model.image_tokenizer
        ids = model.ids
        keep = tuple(i for i in (ids.bos, ids.begin_image) if i >= 0)
        header = (*ids.size_text, *[ids.header] * (ids.header >= 0))
        footer = (ids.frame_end,) if ids.frame_end >= 0 else ()
        return cls(ids.begin_image, ids.end_image, ids.code, tok.grid, tok.config.image_size, ids.row_end,
                   model.config.generation.null_prompt, keep, ids.pad, header, footer, model.generation.mask_id(model),
                   model.generation.noised)
