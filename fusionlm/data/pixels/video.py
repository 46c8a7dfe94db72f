"""Video input: a clip becomes N uniformly sampled frames, and each frame is an image.

A clip is a :class:`Video` in ``Sample.images``, marked in the text by ``<video>`` (``VIDEO_TOKEN``)
where a picture is marked by ``<image>``; placeholders and items are matched in order. Its source
is one of:

* a folder of frame files: every file with an image extension Pillow knows, hidden files left
  out, sorted by name with runs of digits compared as numbers (``f2.png`` before ``f10.png``);
  only the sampled frames are opened, each through :func:`~fusionlm.data.pixels.images.load_image`;
* an animated image file (GIF, animated WebP or PNG): every frame is decoded by
  :func:`~fusionlm.data.pixels.images.load_frames` (the one loader's checks, per frame), so a clip whose
  frames x width x height is over ``max_video_pixels`` (``data.max_video_pixels``) is refused
  from its header, naming the file, before any frame is decoded;
* a list of ``PIL.Image`` frames (in memory, e.g. the synthetic world's clips).

A folder decodes only its sampled frames (at most ``frames`` images, each under the image pixel
cap), so the clip cap is for animated files, which decode all of theirs.

Sampling is uniform and always gives exactly ``frames`` frames (``model.video.frames``): the middle
frame of each of ``frames`` equal segments of the clip; a clip shorter than that repeats frames.
So a video always takes ``frames / temporal_pool`` image slots, whatever its length.

Video files (``.mp4``, ``.webm``, ...) are not decoded: no video library is a dependency of
fusionlm (PyAV installs from PyPI, but bundles FFmpeg for one input format that a folder of
extracted frames or a GIF already covers). They are refused with an ImageError that says how
to convert them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from PIL import Image

from ...errors import ImageError
from .images import DEFAULT_MAX_PIXELS, ImageSource, load_frames
from .paths import resolve_under
from ..sample import IMAGE_TOKEN, VIDEO_TOKEN

DEFAULT_MAX_VIDEO_PIXELS = 400_000_000  # an animated file's frames x width x height (data.max_video_pixels)
VIDEO_FILE_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")

VideoSource = Union[str, os.PathLike, list]


@dataclass(eq=False)
class Video:
    """A clip: a folder of frame files, an animated GIF/WebP/PNG path, or a list of PIL frames."""

    source: VideoSource

    def __post_init__(self) -> None:
        if isinstance(self.source, tuple):
            self.source = list(self.source)
        if isinstance(self.source, list):
            bad = [type(f).__name__ for f in self.source if not isinstance(f, Image.Image)]
            if bad:
                raise TypeError(f"Video: a list of frames must hold PIL images, got {bad[0]}")
        elif not isinstance(self.source, (str, os.PathLike)):
            raise TypeError(f"Video: unsupported source type {type(self.source).__name__} "
                            f"(a folder, an animated image file or a list of PIL frames)")

    @property
    def name(self) -> str:
        """What errors call this clip: its path, or ``<video>`` for frames in memory."""
        return "<video>" if isinstance(self.source, list) else os.fspath(self.source)


def placeholder(item: Any) -> str:
    """The text placeholder of a ``Sample.images`` item: ``<video>`` for a Video, else ``<image>``."""
    return VIDEO_TOKEN if isinstance(item, Video) else IMAGE_TOKEN


def sample_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread uniformly over ``total`` frames: the middle of each of ``n``
    equal segments (``total=8, n=4`` -> ``[1, 3, 5, 7]``; ``total=3, n=6`` -> ``[0, 0, 1, 1, 2, 2]``)."""
    if total < 1 or n < 1:
        raise ValueError(f"sample_indices: need total >= 1 and n >= 1, got {total} and {n}")
    return [(2 * i + 1) * total // (2 * n) for i in range(n)]


_DIGITS = re.compile(r"(\d+)")


def _natural_key(name: str) -> list:
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in _DIGITS.split(name) if part]


def frame_files(folder: str | os.PathLike, *, root: str | Path | None = None) -> list[str]:
    """The frame files of a folder, in order, as paths joined to ``folder`` (as given)."""
    name = os.fspath(folder)
    path = resolve_under(folder, root)
    known = {ext.lower() for ext in Image.registered_extensions()}
    try:
        entries = sorted(os.scandir(path), key=lambda e: _natural_key(e.name))
    except OSError as e:
        raise ImageError(f"{name}: cannot list the folder of frames ({e.strerror or e})") from e
    files = [os.path.join(name, e.name) for e in entries
             if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in known and not e.is_dir()]
    if not files:
        raise ImageError(f"{name}: a folder with no frame files (image files such as 00001.png)")
    return files


def frame_sources(video: Video, n: int, *, root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_video_pixels: int | None = DEFAULT_MAX_VIDEO_PIXELS) -> list[ImageSource]:
    """The ``n`` sampled frames of ``video``: file paths for a folder (each then goes through
    ``load_image``, so a bad frame's error names its file), decoded images otherwise.
    ``max_video_pixels`` caps an animated file's decoded pixels, all frames together (None: no cap)."""
    source = video.source
    if isinstance(source, list):
        if not source:
            raise ImageError(f"{video.name}: a list of no frames")
        return [source[i] for i in sample_indices(len(source), n)]
    name = os.fspath(source)
    path = resolve_under(source, root)
    if os.path.isdir(path):
        files = frame_files(source, root=root)
        return [files[i] for i in sample_indices(len(files), n)]
    if os.path.splitext(name)[1].lower() in VIDEO_FILE_SUFFIXES:
        raise ImageError(f"{name}: video files are not decoded by fusionlm; extract the frames to a folder "
                         f"(e.g. ffmpeg -i {os.path.basename(name)} frames/%05d.png) or convert the clip to a GIF")
    return load_frames(source, root=root, max_pixels=max_pixels, pick=lambda total: sample_indices(total, n),
                       max_total_pixels=max_video_pixels)
