"""One record of a streamed dataset (a parquet / Arrow row, a JSON line, a tar sample) as a ``Sample``.

A record is one of three shapes, told apart by its keys:

- interleaved (OBELICS): ``texts`` and ``images``, parallel lists where each position holds a text
  or an image (the other is null) -> a document with an ``<image>`` placeholder per image;
- caption (img2dataset, LAION): ``image`` / ``jpg`` / ``png`` / ``webp`` and ``caption`` / ``txt`` /
  ``text`` -> a document ``<image>caption``;
- text only: ``text`` -> a document.

Images are raw bytes, a ``{"bytes", "path"}`` struct (Hugging Face's Image feature) or a path
relative to the data root (refused if it escapes it). Images are never decoded here: that is the
one image loader's work (``images.load_image``), when the sample is used.
"""

from __future__ import annotations

from typing import Any

from ...errors import SampleError
from ..chat import PLACEHOLDERS
from ..pixels.paths import resolve_under
from ..sample import IMAGE_TOKEN, Sample

IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "txt", "text")


def row_sample(row: Any, *, sid: str, task: str, where: str, root: str) -> Sample:
    """The sample of one record; ``where`` (file and record) starts every error message."""
    if not isinstance(row, dict):
        raise SampleError(f"{where}: expected a record (mapping), got {type(row).__name__}")
    if "texts" in row or isinstance(row.get("images"), list):
        text, images = _interleaved(row, where, root, sid)
    elif any(row.get(k) is not None for k in IMAGE_KEYS):
        key = next(k for k in IMAGE_KEYS if row.get(k) is not None)
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None)
        if caption is None:
            raise SampleError(f"{where}: image without a caption (one of {', '.join(CAPTION_KEYS)})")
        text, images = IMAGE_TOKEN + caption, [image_value(row[key], where, root, sid)]
    elif isinstance(row.get("text"), str):
        text, images = row["text"], []
    else:
        raise SampleError(f"{where}: no 'text', no 'texts'/'images' lists and no image+caption "
                          f"(keys: {', '.join(map(str, row)) or 'none'})")
    found = len(PLACEHOLDERS.findall(text))
    if found != len(images):
        raise SampleError(f"{where}: text has {found} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
    return Sample(id=sid, task=task, kind="document", text=text, images=images)


def _interleaved(row: dict, where: str, root: str, sid: str) -> tuple[str, list[Any]]:
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SampleError(f"{where}: 'texts' and 'images' must be lists of the same length")
    parts, items = [], []
    for k, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SampleError(f"{where}: position {k} must hold a text or an image (exactly one)")
        if text is not None:
            if not isinstance(text, str):
                raise SampleError(f"{where}: texts[{k}] is a {type(text).__name__}, not a string")
            parts.append(text)
        else:
            items.append(image_value(image, f"{where}: images[{k}]", root, sid))
            parts.append(IMAGE_TOKEN)
    return "\n".join(parts), items


def image_value(value: Any, where: str, root: str, sid: str) -> Any:
    """Raw bytes, or a checked absolute path inside ``root``."""
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        return resolve_under(value, root, where=f"{where}: sample {sid}")
    raise SampleError(f"{where}: an image must be bytes or a path, got {type(value).__name__}")
