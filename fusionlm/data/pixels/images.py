"""The one image loader shared by training, evaluation and serving.

Every entry point (a path, raw bytes, an open ``PIL.Image``) goes through the same decode and
conversion steps, so the same file yields bitwise-identical pixels everywhere. Every problem with
the input becomes a one-line :class:`~fusionlm.errors.ImageError` naming the file.

Conversion rules (all end in 8-bit RGB):

* EXIF orientation is applied; animated GIF/WebP give their first frame (``load_frames``
  gives them all, for video input).
* Alpha (RGBA, LA, PA, RGBa, palette or grey with transparency) is composited on ``BACKGROUND``.
* 16/32-bit integer grey (``I;16*``, ``I``) is *scaled* by 255/65535 and rounded (values outside
  0..65535 in mode ``I`` are clipped after scaling).
* Float grey (``F``): if the largest finite value is <= 1 the data is taken as 0..1 intensities,
  otherwise it is divided by that maximum; negatives and NaN become 0, then x255 and rounded.
* Everything else (1, L, CMYK, YCbCr, LAB, HSV, ...) uses Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fusionlm.errors import ImageError

from .paths import resolve_under

DEFAULT_MAX_PIXELS = 40_000_000  # refused from the header, before any pixel is decoded
BACKGROUND = (255, 255, 255)  # alpha is composited on white

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_DETAIL_CHARS = 200  # keep Pillow's detail short so the message stays one readable line


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:_DETAIL_CHARS]


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    # Image.open only parsed the header, so this refuses a bomb before any decoding.
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has an empty size {w}×{h}")
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: image is {w}×{h} = {w * h} pixels, over the limit of {max_pixels}"
        )


def _check_clip_size(img: Image.Image, frames: int, name: str, max_total_pixels: int | None) -> None:
    # Counting frames read only their headers: this refuses a long clip before decoding any frame.
    w, h = img.size
    if max_total_pixels is not None and frames * w * h > max_total_pixels:
        raise ImageError(f"{name}: clip of {frames} frames of {w}×{h} = {frames * w * h} pixels, over the "
                         f"limit of {max_total_pixels} decoded pixels per clip (data.max_video_pixels)")


def _pillow_bomb_message(exc: Exception, name: str, max_pixels: int) -> str:
    # Pillow refuses > 2 * MAX_IMAGE_PIXELS inside Image.open, before we see the size; its
    # message carries the pixel count, which we reuse so the refusal reads like ours.
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found and int(found.group(1)) > max_pixels:
        return f"{name}: image is {found.group(1)} pixels, over the limit of {max_pixels}"
    return f"{name}: refused as a decompression bomb by Pillow ({_one_line(exc)})"


def _composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB following the module's rules."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES:
        # "La" cannot convert directly; going through "LA" un-premultiplies it.
        return _composite(img.convert("LA") if mode == "La" else img)
    if "transparency" in img.info and mode in {"P", "L", "RGB", "1"}:
        return _composite(img)
    if mode in _INT_GREY_MODES:
        # Pillow's own convert clips 16-bit values at 255; scaling keeps the full range.
        arr = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(arr.max()) if arr.size else 0.0
        if peak > 1.0:
            arr = arr / peak
        grey = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def _decode(img: Image.Image, name: str, max_pixels: int, frame: int = 0) -> Image.Image:
    """Size-check, fully load, orient and convert frame ``frame`` of ``img``; any decoder failure -> ImageError."""
    _check_size(img, name, max_pixels)
    try:
        if img.tell() != frame:  # a caller's animated image may sit on a later frame
            img.seek(frame)
        img.load()
        out = _to_rgb(ImageOps.exif_transpose(img))
        out.load()
        # exif_transpose/_to_rgb may hand back the caller's object; always return our own.
        return out.copy() if out is img else out
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(_pillow_bomb_message(e, name, max_pixels)) from e
    except Exception as e:  # decoding untrusted data: Pillow raises many types (OSError, ...)
        raise ImageError(f"{name}: truncated or corrupt image data ({_one_line(e)})") from e


def _open_and_decode(fp: io.BytesIO | str, name: str, max_pixels: int) -> Image.Image:
    try:
        with Image.open(fp) as img:
            return _decode(img, name, max_pixels)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a recognised image") from e
    except Image.DecompressionBombError as e:  # Pillow's own hard cap, met in Image.open
        raise ImageError(_pillow_bomb_message(e, name, max_pixels)) from e
    except Exception as e:
        raise ImageError(f"{name}: cannot read image ({_one_line(e)})") from e


def load_image(
    source: ImageSource,
    *,
    root: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load a path, raw bytes or a PIL image as a fully decoded RGB image.

    Raises ImageError (one line, naming the file, ``<bytes>`` or ``<image>``) for a path outside
    ``root``, a missing/empty/unreadable file, a non-image, truncated or corrupt data, and images
    over ``max_pixels``. A caller's PIL image is never modified, apart from a seek to frame 0.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this global set, Pillow silently pads truncated files, so the same file could
        # give different pixels (or none) in different processes. Refuse rather than drift.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code; fusionlm "
            "requires truncated images to be errors. Leave it at False."
        )
    with warnings.catch_warnings():
        # Our own max_pixels check decides; Pillow's warning must not become an exception
        # under `-W error`. Pillow's hard DecompressionBombError is converted below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if isinstance(source, Image.Image):
            return _decode(source, "<image>", max_pixels)
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageError("<bytes>: empty (0 bytes), not an image")
            return _open_and_decode(io.BytesIO(bytes(source)), "<bytes>", max_pixels)
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"load_image: unsupported source type {type(source).__name__}")
        name, path = _checked_file(source, root)
        return _open_and_decode(path, name, max_pixels)


def _checked_file(source: str | os.PathLike, root: str | Path | None) -> tuple[str, str]:
    """(the name errors use, the path to open) of an existing, non-empty regular file inside ``root``."""
    name = os.fspath(source)
    path = resolve_under(source, root)
    if not os.path.exists(path):
        raise ImageError(f"{name}: file not found")
    if not os.path.isfile(path):
        raise ImageError(f"{name}: not a regular file")
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({_one_line(e)})") from e
    return name, path


def load_frames(
    source: str | os.PathLike,
    *,
    root: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pick: Callable[[int], Sequence[int]] | None = None,
    max_total_pixels: int | None = None,
) -> list[Image.Image]:
    """The frames of an animated image file (GIF, animated WebP or PNG) as RGB images.

    The same checks and conversion rules as :func:`load_image`, applied to every frame: every
    frame is decoded (so a truncated or corrupt frame anywhere is an error; only a GIF cut exactly
    between two frames reads as a shorter clip, which the format cannot tell apart), and
    ``pick(n_frames)`` (default: all) says which ones to return, in that order, repeats allowed.
    A file with a single frame is refused (it is an image, not a clip); each frame counts against
    ``max_pixels`` on its own, and all of them together (frames x width x height, every frame
    being decoded at the file's full size) against ``max_total_pixels`` (None: no cap), both
    checked from the headers before any frame is decoded.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code; fusionlm "
                           "requires truncated images to be errors. Leave it at False.")
    name, path = _checked_file(source, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                _check_size(img, name, max_pixels)
                try:
                    total = int(getattr(img, "n_frames", 1))
                except Exception as e:  # counting frames reads every frame header
                    raise ImageError(f"{name}: truncated or corrupt image data ({_one_line(e)})") from e
                if total < 2:
                    raise ImageError(f"{name}: not an animated image ({total} frame); a video is a folder of "
                                     f"frames or an animated GIF/WebP/PNG")
                _check_clip_size(img, total, name, max_total_pixels)
                wanted = list(pick(total)) if pick is not None else list(range(total))
                if any(not 0 <= i < total for i in wanted):
                    raise ValueError(f"load_frames: frame indices {wanted} outside 0..{total - 1}")
                keep = set(wanted)
                frames = {}
                for i in range(total):
                    frame = _decode(img, name, max_pixels, frame=i)
                    if i in keep:
                        frames[i] = frame
                return [frames[i] for i in wanted]
        except ImageError:
            raise
        except UnidentifiedImageError as e:
            raise ImageError(f"{name}: not a recognised image") from e
        except Image.DecompressionBombError as e:
            raise ImageError(_pillow_bomb_message(e, name, max_pixels)) from e
        except OSError as e:
            raise ImageError(f"{name}: cannot read image ({_one_line(e)})") from e


def fit_square(
    img: Image.Image,
    size: int,
    *,
    background: tuple[int, int, int] = BACKGROUND,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Letterbox ``img`` into a ``size``×``size`` RGB image: longer side == size, centred."""
    if size < 1:
        raise ValueError(f"fit_square: size must be >= 1, got {size}")
    img = img if img.mode == "RGB" else _to_rgb(img)
    w, h = img.size
    scale = size / max(w, h)
    # The longer side is exactly `size`; the short side is rounded but never below 1 px.
    nw = size if w >= h else max(1, round(w * scale))
    nh = size if h >= w else max(1, round(h * scale))
    resized = img.resize((nw, nh), resample=resample)
    canvas = Image.new("RGB", (size, size), tuple(background))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def to_pixels(
    img: Image.Image,
    size: int,
    *,
    mean: tuple[float, float, float] = SIGLIP_MEAN,
    std: tuple[float, float, float] = SIGLIP_STD,
) -> torch.Tensor:
    """Return a normalised (3, size, size) float32 tensor; letterboxes first if needed."""
    if img.mode != "RGB" or img.size != (size, size):
        img = fit_square(img, size)
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((arr - m) / s))


def image_to_pixels(
    source: ImageSource,
    size: int,
    *,
    mean: tuple[float, float, float] = SIGLIP_MEAN,
    std: tuple[float, float, float] = SIGLIP_STD,
    root: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """``load_image`` + ``fit_square`` + ``to_pixels``: the single path from input to tensor."""
    img = load_image(source, root=root, max_pixels=max_pixels)
    return to_pixels(fit_square(img, size), size, mean=mean, std=std)
