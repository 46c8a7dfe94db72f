"""lmms-eval's requests as fusionlm's: visuals to images and clips, contexts to ``Request``s,
gen_kwargs to generation settings, and answers cut at the stop strings."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ...data.chat import PLACEHOLDERS
from ...data.pixels.video import VIDEO_FILE_SUFFIXES, Video, placeholder
from ...errors import SampleError
from ...generate import MAX_NEW_TOKENS, Request

log = logging.getLogger("fusionlm.lmms")


def to_items(visuals: Any) -> list[Any]:
    """lmms-eval visuals (None, one visual, or a possibly nested list) -> fusionlm image items.

    PIL images and image paths stay as they are; a folder, or a path with a video suffix, becomes
    a ``Video``. Audio (lmms-eval passes it as a dict) is refused with a ``SampleError``.
    """
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    items: list[Any] = []
    for v in visuals:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            items.extend(to_items(v))
        elif isinstance(v, Video):
            items.append(v)
        elif isinstance(v, (str, os.PathLike)):
            path = Path(v)
            items.append(Video(v) if path.is_dir() or path.suffix.lower() in VIDEO_FILE_SUFFIXES else v)
        elif isinstance(v, dict):
            raise SampleError(f"an audio input ({', '.join(sorted(v))}): fusionlm models take images and video only")
        elif hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image
            items.append(v)
        else:
            raise SampleError(f"a visual of type {type(v).__name__}: expected a PIL image, an image path or a video")
    return items


def to_request(context: str, visuals: Any, *, id: str = "request", image_placement: str = "auto") -> Request:
    """One fusionlm ``Request`` for an lmms-eval context and its visuals.

    ``image_placement="auto"``: when the context's ``<image>`` / ``<video>`` placeholders match the
    items one for one (in order and kind), they stay where they are; otherwise (and always with
    ``"first"``) they are removed and every item goes before the text, one placeholder a line.
    """
    if image_placement not in ("auto", "first"):
        raise ValueError(f"image_placement: {image_placement!r} (expected 'auto' or 'first')")
    items = to_items(visuals)
    context = context or ""
    found = PLACEHOLDERS.findall(context)
    if image_placement == "auto" and found == [placeholder(item) for item in items]:
        return Request(context, items, id=id)
    if found:
        context = PLACEHOLDERS.sub("", context).strip()
    prompt = "".join(f"{placeholder(item)}\n" for item in items) + context
    return Request(prompt, items, id=id)




@dataclass(frozen=True)
class GenSettings:
    """What ``generate`` is called with for a request (hashable: requests are batched by it)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    def kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}


def generation_settings(gen_kwargs: dict | None, *,
                        default_max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[GenSettings, list[str]]:
    """lmms-eval gen_kwargs -> (settings, stop strings).

    Greedy unless ``do_sample`` is true or, with no ``do_sample``, ``temperature`` is positive
    (``do_sample`` with no temperature samples at 1.0). ``top_p: None`` means 1. ``until``: a
    string or a list of strings. Other keys (``num_beams``, ``image_aspect_ratio``…) are ignored.
    """
    kw = dict(gen_kwargs or {})
    until = kw.get("until")
    stops = [until] if isinstance(until, str) else [s for s in (until or []) if isinstance(s, str)]
    max_new = int(kw.get("max_new_tokens") or default_max_new_tokens)
    temperature = float(kw.get("temperature") or 0.0)
    do_sample = kw.get("do_sample")
    if do_sample is not None and not do_sample:
        temperature = 0.0
    elif do_sample and temperature <= 0:
        temperature = 1.0
    top_p = kw.get("top_p")
    top_p = 1.0 if top_p is None or temperature <= 0 else float(top_p)
    if int(kw.get("num_beams") or 1) > 1:
        log.warning("num_beams=%s: fusionlm decodes without beam search (greedy or sampled)", kw["num_beams"])
    return GenSettings(max_new, temperature, top_p), [s for s in stops if s]


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (empty strings are ignored)."""
    end = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if 0 <= at < end:
                end = at
    return text[:end]
