"""The one prompt path: a sample with its pictures -> token ids, labels and encoder inputs.

Training batches, generation, evaluation, the lmms-eval adapter, ``fusionlm info`` and ``data
check`` all encode through ``PromptEncoder``, so an image takes the same positions everywhere:
each item is preprocessed (``ImageSpec.process_all``: itself, its tiles and thumbnail, or a
video's frames), the model's ``ImageLayout`` turns those inputs into image token ids, and
``chat.encode`` puts them where the sample's placeholders are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import SampleError
from .chat import Encoded, SkipSample, encode
from .drawing import DrawLayout, drawn_items
from .layout import ImageLayout
from .pixels.processing import ImageInput, ImageSpec
from .sample import IMAGE_TOKEN, Sample


@dataclass(frozen=True)
class Prompted:
    """One encoded sample and the encoder inputs of its pictures, in order."""

    encoded: Encoded
    inputs: list[ImageInput]
    # each (3, S, S): the pictures written as codes, in order: those the sample draws, and with the
    # early fusion those it shows too
    drawn: list[torch.Tensor] = field(default_factory=list)
    image_positions: int = 0  # positions its pictures take in the sequence (their layouts, markers included)
    # the diffusion design in training: each drawn picture's noise (3, S, S) and noise level
    noise: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class PromptEncoder:
    """Encodes samples and requests for one model: its tokenizer, image spec and layout."""

    tokenizer: Any
    spec: ImageSpec | None  # None: for samples without pictures only
    layout: ImageLayout
    max_length: int
    image_token: str = IMAGE_TOKEN
    end_token: str | None = None  # what ends a turn; None: the tokenizer's eos
    draw: DrawLayout | None = None  # a model that draws: how it writes the pictures of assistant turns

    @classmethod
    def of(cls, model, tokenizer, spec: ImageSpec | None, *, max_length: int | None = None) -> "PromptEncoder":
        """The encoder of a built model (its layout, its tokenizer settings, its context)."""
        tokens = model.config.tokenizer
        return cls(tokenizer, spec, model.layout, max_length or model.config.llm.max_length,
                   tokens.image_token, tokens.end_token, DrawLayout.of(model))

    def sample(self, sample: Sample, *, generation_prompt: bool = False, rng=None) -> Prompted:
        """``sample`` as the model reads it. ``rng`` (a numpy generator, the sample's own): a training
        sample of a design that masks codes, masked (``DrawLayout.masked``); of the diffusion design,
        its pictures' noise (``DrawLayout.noise``).

        Raises:
            ImageError: a picture that cannot be read.
            SampleError: placeholders that do not match the pictures.
            SkipSample: too long for ``max_length``, or nothing to learn (without a generation prompt).
        """
        drawn = drawn_items(sample) if self.draw is not None else [False] * len(sample.images)
        coded = [True] * len(drawn) if self.layout.sequence.per_image == "codes" else drawn  # early fusion: all
        per_item = [[] if c else self.spec.process_all(item) for item, c in zip(sample.images, coded)]
        layouts = [self.draw.tokens() if c else self.layout.image_tokens(inputs) for inputs, c in zip(per_item, coded)]
        encoded = encode(sample, self.tokenizer, layouts, max_length=self.max_length, image_token=self.image_token,
                         end_token=self.end_token, add_generation_prompt=generation_prompt, targets=drawn)
        if rng is not None and self.draw is not None and self.draw.mask >= 0:
            ids, labels = self.draw.masked(encoded.input_ids, encoded.labels, rng)
            encoded = replace(encoded, input_ids=ids, labels=labels)
        pictures = [self.draw.pixels(item, **self._loading()) for item, c in zip(sample.images, coded) if c]
        inputs = [inp for inputs in per_item for inp in inputs]
        if sample.null and self.draw is not None and self.draw.null == "padded":  # the pictures shown are padded away
            encoded, inputs = replace(encoded, input_ids=self.draw.padded(encoded.input_ids)), []
        noise, times = self.draw.noise(len(pictures), rng) if rng is not None and self.draw is not None and \
            self.draw.noised else ([], [])
        return Prompted(encoded, inputs, pictures, sum(map(len, layouts)), noise, times)

    def _loading(self) -> dict:
        return {} if self.spec is None else {"root": self.spec.root, "max_pixels": self.spec.max_pixels}

    def request(self, request) -> Prompted:
        """A request's prompt (anything with ``.sample()``), the generation prompt added.

        Raises:
            SampleError: also when the prompt does not fit ``max_length``: a request is refused,
                never silently dropped.
        """
        try:
            return self.sample(request.sample(), generation_prompt=True)
        except SkipSample as exc:
            raise SampleError(str(exc)) from None
