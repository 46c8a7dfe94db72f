"""Samples -> token ids and labels, through the tokenizer's own chat template.

Loss is taken only where the model should produce text: assistant turns (and the token that ends
them) in chats, all text in documents; never on prompts or image tokens. Which characters belong
to an assistant turn is read off the template itself: the turn is what rendering it adds after
the conversation up to it plus the generation prompt. So any template works (fusionlm's own,
Llama 3's, Qwen2's…) as long as rendering a conversation extends rendering its beginning.
Each image placeholder becomes that image's layout (N image tokens, rows + newlines, or a marker);
a ``<video>`` placeholder becomes one image layout per pooled group of the clip's frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError, FusionError, SampleError
from .sample import IMAGE_TOKEN, VIDEO_TOKEN, Sample
from .pixels.video import Video, placeholder

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


PLACEHOLDERS = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")


def check_placeholders(sample: Sample) -> None:
    """Each ``<image>`` / ``<video>`` placeholder, in order, must match an item of ``sample.images``
    of that kind (a picture / a ``Video``), and there must be no item left over."""
    found = PLACEHOLDERS.findall(sample.all_text())
    wanted = [placeholder(item) for item in sample.images]
    if found == wanted:
        return
    n_video, want_video = found.count(VIDEO_TOKEN), wanted.count(VIDEO_TOKEN)
    n_image, want_image = len(found) - n_video, len(wanted) - want_video
    if not n_video and not want_video:
        raise SampleError(f"sample {sample.id}: {n_image} {IMAGE_TOKEN} placeholder(s) in the text but {want_image} image(s)")
    if (n_image, n_video) != (want_image, want_video):
        raise SampleError(f"sample {sample.id}: {n_image} {IMAGE_TOKEN} and {n_video} {VIDEO_TOKEN} placeholder(s) in the "
                          f"text but {want_image} image(s) and {want_video} video(s)")
    k = next(i for i, (a, b) in enumerate(zip(found, wanted)) if a != b)
    raise SampleError(f"sample {sample.id}: placeholder {k + 1} is {found[k]} but item {k + 1} is "
                      f"{'a video' if wanted[k] == VIDEO_TOKEN else 'an image'} (placeholders and items match in order)")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render(sample: Sample, tokenizer, *, image_token: str = IMAGE_TOKEN, end_token: str,
           add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The sample as text, and the character spans that are trained."""
    if sample.kind == "document":
        bos = tokenizer.bos_token or ""
        text = bos + PLACEHOLDERS.sub(lambda _: image_token, sample.text) + end_token
        return text, [(len(bos), len(text))]
    messages = [{"role": m["role"], "content": PLACEHOLDERS.sub(lambda _: image_token, m["content"])}
                for m in sample.messages]
    full = _render(tokenizer, messages, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ConfigError(
                "the tokenizer's chat template renders a conversation differently from its beginning, so the "
                "assistant turns cannot be located; give the LLM a template without that (model.tokenizer.path)"
            )
        end = len(upto.rstrip())  # the turn and its end token, not the whitespace after it
        spans.append((len(before), end))
    return full, spans


def encode(sample: Sample, tokenizer, layouts: Sequence[list[int]] | list[int], *, max_length: int,
           image_token: str = IMAGE_TOKEN, end_token: str | None = None,
           add_generation_prompt: bool = False, targets: Sequence[bool] | None = None) -> Encoded:
    """Token ids and labels for one sample.

    Args:
        layouts: the token ids of each item of ``sample.images``, in order (or one list used for
            every image): a video's are those of all its pooled frame groups (``ImageLayout.image_tokens``).
        image_token: the tokenizer's image token (each ``<image>`` / ``<video>`` placeholder becomes
            one, then that item's layout).
        end_token: what ends a turn (documents end with it); default the tokenizer's eos.
        targets: for each item, whether its layout is a target (an image the model draws); default none.
    Raises:
        SampleError: the placeholders don't match the images (a data error, found before training).
        SkipSample: too long for the context (never cut inside an image), or nothing to learn.
    """
    check_placeholders(sample)
    if layouts and isinstance(layouts[0], int):
        if any(isinstance(item, Video) for item in sample.images):
            raise ValueError("encode: a sample with a video needs a layout per item, not one for every image")
        layouts = [layouts] * len(sample.images)
    text, spans = render(sample, tokenizer, image_token=image_token, end_token=end_token or tokenizer.eos_token,
                         add_generation_prompt=add_generation_prompt)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    labels: list[int] = []
    n_image = 0
    for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tok == image_id:
            layout = layouts[n_image]
            ids.extend(layout)
            labels.extend(layout if targets and targets[n_image] else [IGNORE] * len(layout))
            n_image += 1
            continue
        ids.append(tok)
        labels.append(tok if any(s <= start < e for s, e in spans) else IGNORE)
    if len(ids) > max_length:
        raise SkipSample(sample.id, "too_long", f"{len(ids)} tokens with images, over the context of {max_length}")
    if not add_generation_prompt and all(label == IGNORE for label in labels[1:]):
        raise SkipSample(sample.id, "no_target", "no token to learn from")
    return Encoded(sample.id, ids, labels, list(sample.images))


def end_of_turn(tokenizer) -> str:
    """The token that ends an assistant turn in this tokenizer's chat template (else its eos)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        text = _render(tokenizer, messages, False)
    except Exception:  # a template that needs more than this (a system turn…): fall back
        text = ""
    at = text.rfind("ok")
    if at >= 0:
        rest = text[at + 2:].lstrip()
        for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
            if rest.startswith(token):
                return token
    if tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has no end-of-turn token; set model.tokenizer.end_token")
    return tokenizer.eos_token
