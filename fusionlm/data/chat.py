"""Samples -> token ids and labels, following the tokenizer's chat template piece by piece.

Loss is taken only where the model should produce text: assistant turns (and their end token) in
chats, all text in documents; never on prompts or image tokens. Each ``<image>`` becomes the
model's image layout (N image tokens for Method A, rows + newlines for Fuyu, one marker for B).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FusionError, SampleError
from .sample import IMAGE_TOKEN, Sample
from .tokenizer import ASSISTANT, END

IGNORE = -100


class SkipSample(FusionError):
    """A sample that training leaves out; ``reason`` is the counter it goes into."""

    def __init__(self, sample_id: str, reason: str, detail: str):
        super().__init__(f"sample {sample_id}: {detail}")
        self.reason = reason


@dataclass
class Encoded:
    sample_id: str
    input_ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)


def check_placeholders(sample: Sample) -> None:
    found = sample.all_text().count(IMAGE_TOKEN)
    if found != len(sample.images):
        raise SampleError(
            f"sample {sample.id}: {found} {IMAGE_TOKEN} placeholder(s) in the text but {len(sample.images)} image(s)"
        )


def segments(sample: Sample, *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered text in (piece, trained) pieces; joined it equals the chat template's output."""
    if sample.kind == "document":
        return [(sample.text + END, True)]
    pieces: list[tuple[str, bool]] = []
    for m in sample.messages:
        role = m["role"]
        if role == "assistant":
            pieces.append((f"{ASSISTANT}\n", False))
            pieces.append((m["content"] + END, True))
            pieces.append(("\n", False))
        else:
            pieces.append((f"<|{role}|>\n{m['content']}{END}\n", False))
    if add_generation_prompt:
        pieces.append((f"{ASSISTANT}\n", False))
    return pieces


def encode(sample: Sample, tokenizer, image_layout: list[int], *, max_length: int,
           add_generation_prompt: bool = False) -> Encoded:
    """Token ids and labels for one sample.

    Raises:
        SampleError: the placeholders don't match the images (a data error, found before training).
        SkipSample: too long for the context (never cut inside an image), or nothing to learn.
    """
    check_placeholders(sample)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(sample, add_generation_prompt=add_generation_prompt):
        for tok in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if tok == image_id:
                ids.extend(image_layout)
                labels.extend([IGNORE] * len(image_layout))
            else:
                ids.append(tok)
                labels.append(tok if trained else IGNORE)
    if len(ids) > max_length:
        raise SkipSample(sample.id, "too_long", f"{len(ids)} tokens with images, over the context of {max_length}")
    if not add_generation_prompt and all(label == IGNORE for label in labels[1:]):
        raise SkipSample(sample.id, "no_target", "no token to learn from")
    return Encoded(sample.id, ids, labels, list(sample.images))
