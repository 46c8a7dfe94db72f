"""A picture grid of evaluated examples, for a report: one row per task, a few examples per row,
each with its picture(s), the question, the model's answer and the reference, framed green when
the answer is right and red when it is wrong (``fusionlm demo`` writes it as ``examples.png``).

An example is right when its score is at least ``RIGHT_FROM`` (0.5): 1 for an exact match, a
soft or partial score from half of full credit on (for captions: a sample's CIDEr-D of 0.5 or more).
Pictures come from the data source by the example's id (the world's ``test/table/000003`` is
``source.get(task, "test", 3)``); a clip shows its first frame, and an example whose id names no
sample of the source (a file's own ids), or whose pictures cannot be read, shows none.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..data.pixels.images import load_image
from ..data.pixels.video import Video, frame_sources
from ..errors import FusionError
from .results import TaskResult

RIGHT_FROM = 0.5
RIGHT, WRONG = (0, 150, 60), (210, 30, 30)  # frame and answer colours
INK, FAINT, PAPER = (20, 20, 20), (90, 90, 90), (255, 255, 255)

Box = tuple[int, int, int, int]  # left, top, right, bottom (inclusive), pixels


@dataclass(frozen=True)
class Cell:
    """One example as drawn: its pictures and its three texts."""

    pictures: list[Image.Image]
    question: str
    answer: str
    reference: str
    right: bool


@dataclass(frozen=True)
class Row:
    label: str  # the task (and its shots), with its score
    cells: list[Cell]


@dataclass(frozen=True)
class Layout:
    """Sizes in pixels: a cell is ``width`` wide, its pictures ``picture`` high above ``lines`` of text."""

    width: int = 232
    picture: int = 96
    label: int = 150
    line: int = 13
    question_lines: int = 2
    answer_lines: int = 3
    reference_lines: int = 3
    pad: int = 8
    frame: int = 4
    font_size: int = 11

    @property
    def lines(self) -> int:
        return self.question_lines + self.answer_lines + self.reference_lines

    @property
    def height(self) -> int:
        """A cell's height, frame included."""
        return 2 * (self.frame + self.pad) + self.picture + self.pad + self.lines * self.line


@dataclass(frozen=True)
class Grid:
    """What was written: the PNG, its row labels, and each cell's frame (row by row)."""

    path: Path
    labels: list[str]
    boxes: list[list[Box]]


# ----------------------------------------------------------------------------- examples to cells

def is_right(example: dict, threshold: float = RIGHT_FROM) -> bool:
    return float(example.get("score", 0.0)) >= threshold


def sample_key(example_id: str) -> tuple[str, int] | None:
    """(split, index) of a world id such as ``test/table/000003``; None for any other id."""
    parts = example_id.split("/")
    return (parts[0], int(parts[2])) if len(parts) == 3 and parts[2].isdigit() else None


def still(item: Any, root: str | Path | None = None) -> Image.Image | None:
    """An RGB picture of one ``Sample.images`` item: the image, or a clip's first frame; None if unreadable."""
    try:
        if isinstance(item, Video):
            frames = item.source if isinstance(item.source, list) else frame_sources(item, 1, root=root)
            item = frames[0]
        return load_image(item, root=root)
    except (FusionError, OSError, IndexError):
        return None


def pictures_of(source, task: str, example: dict) -> list[Image.Image]:
    """The pictures of the sample an example answers (none if its id names no sample of ``source``)."""
    key = sample_key(str(example.get("id", "")))
    if key is None:
        return []
    try:
        sample = source.get(task, *key)
    except (FusionError, ValueError, IndexError, KeyError):
        return []
    root = getattr(source, "root", None)
    return [p for p in (still(item, root) for item in sample.images) if p is not None]


def plain(text: str) -> str:
    """One line of text: image markers dropped, newlines (a table's rows) as `` / ``, spaces collapsed."""
    text = text.replace("<image>", " ").replace("<video>", " ")
    return " ".join(" / ".join(line.strip() for line in text.strip().splitlines() if line.strip()).split())


def cell_of(source, task: str, example: dict) -> Cell:
    references = example.get("references") or [""]
    return Cell(pictures_of(source, task, example), plain(example.get("question", "")),
                plain(str(example.get("answer", ""))), plain(str(references[0])), is_right(example))


def label_of(result: TaskResult) -> str:
    shots = f" ({result.shots}-shot)" if result.shots else ""
    scores = [f"{m}: {s:.3f}" for m, s in [(result.metric, result.score), *result.extra.items()]]
    return "\n".join([result.task + shots, *scores])


def rows_of(results: list[TaskResult], source, per_task: int = 4) -> list[Row]:
    """A row per task with answered examples (drawing tasks, whose examples are pictures, have none)."""
    rows = []
    for r in results:
        answered = [e for e in r.examples if "answer" in e][:per_task]
        if answered:
            rows.append(Row(label_of(r), [cell_of(source, r.task, e) for e in answered]))
    return rows


# ----------------------------------------------------------------------------- drawing

def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrapped(text: str, face, width: int, max_lines: int) -> list[str]:
    """``text`` broken into at most ``max_lines`` lines of at most ``width`` pixels; cut text ends in ``...``."""
    chars = max(4, int(width / max(1.0, face.getlength("n"))))
    lines = textwrap.wrap(text, chars, break_long_words=True) or [""]
    while any(face.getlength(line) > width for line in lines) and chars > 4:
        chars -= 1
        lines = textwrap.wrap(text, chars, break_long_words=True)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, len(lines[-1]) - 3)].rstrip() + "..."
    return lines


def strip_of(pictures: list[Image.Image], width: int, height: int, gap: int) -> Image.Image:
    """The pictures side by side, scaled alike to fit ``width`` x ``height`` (pixelated when enlarged)."""
    strip = Image.new("RGB", (width, height), (235, 235, 235))
    if not pictures:
        return strip
    total = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    scale = min(height / max(p.height for p in pictures), width / total)
    x = max(0, (width - round(total * scale)) // 2)
    for p in pictures:
        size = (max(1, round(p.width * scale)), max(1, round(p.height * scale)))
        resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
        strip.paste(p.resize(size, resample), (x, (height - size[1]) // 2))
        x += size[0] + gap
    return strip


def draw_cell(canvas: Image.Image, cell: Cell, left: int, top: int, layout: Layout, face) -> Box:
    pen = ImageDraw.Draw(canvas)
    box = (left, top, left + layout.width - 1, top + layout.height - 1)
    pen.rectangle(box, outline=RIGHT if cell.right else WRONG, width=layout.frame)
    inner = layout.frame + layout.pad
    x, y = left + inner, top + inner
    text_width = layout.width - 2 * inner
    canvas.paste(strip_of(cell.pictures, text_width, layout.picture, layout.pad // 2), (x, y))
    y += layout.picture + layout.pad
    blocks = [(cell.question, layout.question_lines, FAINT), (f"answer: {cell.answer}", layout.answer_lines,
              RIGHT if cell.right else WRONG), (f"reference: {cell.reference}", layout.reference_lines, INK)]
    for text, n, colour in blocks:
        for i, line in enumerate(wrapped(text, face, text_width, n)):
            pen.text((x, y + i * layout.line), line, fill=colour, font=face)
        y += n * layout.line
    return box


def draw_grid(rows: list[Row], path: str | Path, layout: Layout = Layout()) -> Grid:
    """Write ``rows`` as a PNG at ``path``: a label column, then one cell per example."""
    path = Path(path)
    columns = max((len(r.cells) for r in rows), default=0)
    width = layout.label + columns * (layout.width + layout.pad) + layout.pad
    height = len(rows) * (layout.height + layout.pad) + layout.pad
    canvas = Image.new("RGB", (width, height), PAPER)
    face, pen, boxes = font(layout.font_size), ImageDraw.Draw(canvas), []
    for i, row in enumerate(rows):
        top = layout.pad + i * (layout.height + layout.pad)
        pen.multiline_text((layout.pad, top + layout.pad), row.label, fill=INK, font=face, spacing=3)
        boxes.append([draw_cell(canvas, cell, layout.label + j * (layout.width + layout.pad), top, layout, face)
                      for j, cell in enumerate(row.cells)])
    canvas.save(path)
    return Grid(path, [r.label for r in rows], boxes)


def example_grid(results: list[TaskResult], source, path: str | Path, *, per_task: int = 4,
                 layout: Layout = Layout()) -> Grid:
    """The first ``per_task`` examples of each task in ``results``, as a picture grid at ``path``."""
    return draw_grid(rows_of(results, source, per_task), path, layout)
