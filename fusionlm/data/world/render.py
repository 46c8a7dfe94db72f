"""Drawing the synthetic world: an image key (a tuple that fully describes a picture) -> pixels.

Shapes are drawn at 4x and box-downsampled (smooth edges, exact interior colours); text uses
Pillow's built-in scalable font, or a scaled bitmap font where FreeType is missing.
"""

from __future__ import annotations

import functools
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
BAR_LABELS = ("A", "B", "C")
_SS = 4  # shapes are drawn at 4x and box-downsampled: smooth edges, exact interior colours



def render_image(key: tuple) -> Image.Image:
    """Draw the picture an image key describes (an RGB ``PIL.Image``)."""
    kind = key[0]
    if kind == "shapes":
        return _render_shapes(*key[1:])
    if kind == "word":
        return _render_word(*key[1:])
    if kind == "table":
        return _render_table(*key[1:])
    if kind == "chart":
        return _render_chart(*key[1:])
    if kind == "prices":
        return _render_prices(*key[1:])
    raise ValueError(f"unknown image key kind {kind!r}")


def render_clip(key: tuple) -> list[Image.Image]:
    """Draw the frames a clip key describes: ``("motion", w, h, n_frames, color, d, start, end,
    others)`` is a circle of ``color`` and diameter ``d`` moving in a straight line from centre
    ``start`` to ``end`` (positions rounded to whole pixels) over ``n_frames`` frames, drawn over
    the static shapes ``others``."""
    kind, width, height, n, color, d, (x0, y0), (x1, y1), others = key
    if kind != "motion":
        raise ValueError(f"unknown clip key kind {kind!r}")
    return [_render_shapes(width, height, tuple(others) + (("circle", color, cx, cy, d),))
            for cx, cy in clip_path(n, (x0, y0), (x1, y1))]


def clip_path(n: int, start: tuple[int, int], end: tuple[int, int]) -> list[tuple[int, int]]:
    """The ``n`` centres of a straight move from ``start`` to ``end``, both included."""
    return [(round(start[0] + (end[0] - start[0]) * k / (n - 1)), round(start[1] + (end[1] - start[1]) * k / (n - 1)))
            for k in range(n)]


def _render_shapes(width: int, height: int, elems: tuple) -> Image.Image:
    img = Image.new("RGB", (width * _SS, height * _SS), WHITE)
    draw = ImageDraw.Draw(img)
    for shape, color, cx, cy, d in elems:
        x, y, r = cx * _SS, cy * _SS, d * _SS / 2
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == "square":
            h = 0.88 * r  # a square a little smaller than its circle looks the same size
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:  # triangle, apex up, filling the bounding box
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return img.reduce(_SS)


@functools.lru_cache(maxsize=128)
def _font(size: int) -> ImageFont.FreeTypeFont | None:
    """Pillow's embedded scalable font at ``size`` pixels, or None without FreeType."""
    try:
        font = ImageFont.load_default(size=size)
    except Exception:  # pragma: no cover - Pillow built without FreeType
        return None
    return font if isinstance(font, ImageFont.FreeTypeFont) else None


@functools.lru_cache(maxsize=1)
def _bitmap_font() -> Any:
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader else ImageFont.load_default()


def _bitmap_text(text: str, size: int) -> Image.Image:
    """Fallback without FreeType: the bitmap font's text as an 'L' mask scaled to ``size`` high."""
    font = _bitmap_font()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    scale = max(1, size) / mask.height * 0.75
    return mask.resize((max(1, round(mask.width * scale)), max(1, round(mask.height * scale))),
                       Image.Resampling.BILINEAR)


@functools.lru_cache(maxsize=4096)
def text_width(text: str, size: int) -> float:
    font = _font(size)
    return font.getlength(text) if font else _bitmap_text(text, size).width


@functools.lru_cache(maxsize=4096)
def fit_size(text: str, max_width: float, max_size: int) -> int:
    """The largest font size <= ``max_size`` whose rendering of ``text`` is <= ``max_width`` wide."""
    size = max(4, max_size)
    width = text_width(text, size)
    if width > max_width:
        size = max(4, int(size * max_width / width))
        while size > 4 and text_width(text, size) > max_width:
            size -= 1
    return size


def _draw_text(img: Image.Image, xy: tuple[float, float], text: str, size: int,
               anchor: str = "mm", fill: tuple[int, int, int] = BLACK) -> None:
    """Draw ``text`` with its anchor (``"mm"`` centre or ``"lm"`` left-middle) at ``xy``."""
    font = _font(size)
    if font is not None:
        ImageDraw.Draw(img).text(xy, text, fill=fill, font=font, anchor=anchor)
        return
    mask = _bitmap_text(text, size)
    x = xy[0] - (mask.width / 2 if anchor[0] == "m" else 0)
    img.paste(Image.new("RGB", mask.size, fill), (round(x), round(xy[1] - mask.height / 2)), mask)


def _render_word(width: int, height: int, word: str, size: int, cx: int, cy: int) -> Image.Image:
    img = Image.new("RGB", (width, height), WHITE)
    _draw_text(img, (cx, cy), word, size)
    return img


def _render_table(width: int, height: int, header: tuple, values: tuple) -> Image.Image:
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    cols, lw = len(header), max(1, height // 32)
    xs = [round(i * (width - 1) / cols) for i in range(cols + 1)]
    ys = [0, (height - 1) // 2, height - 1]
    draw.rectangle((0, 0, width - 1, ys[1]), fill=(225, 225, 225))  # shaded header row
    size = fit_size(max(header, key=len), 0.85 * (width / cols), round(0.55 * height / 2))
    for r, cells in enumerate((header, values)):
        for c, cell in enumerate(cells):
            _draw_text(img, ((xs[c] + xs[c + 1]) / 2, (ys[r] + ys[r + 1]) / 2), str(cell), size)
    for x in xs:
        draw.line((x, 0, x, height - 1), fill=BLACK, width=lw)
    for y in ys:
        draw.line((0, y, width - 1, y), fill=BLACK, width=lw)
    return img


def _chart_layout(width: int, height: int) -> tuple[int, int, float, float]:
    """(baseline y, plot height, slot width, bar width) of a 3-bar chart."""
    label_band, top_band = round(0.2 * height), round(0.2 * height)
    baseline = height - label_band
    return baseline, baseline - top_band, width / 3, 0.5 * width / 3


def _render_chart(width: int, height: int, color: str, values: tuple) -> Image.Image:
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    baseline, plot_h, slot, bar_w = _chart_layout(width, height)
    text_size = max(4, round(0.19 * height))
    for i, (label, value) in enumerate(zip(BAR_LABELS, values)):
        cx, top = (i + 0.5) * slot, baseline - round(value / 9 * plot_h)
        draw.rectangle((cx - bar_w / 2, top, cx + bar_w / 2 - 1, baseline - 1), fill=COLORS[color])
        _draw_text(img, (cx, top - 0.1 * height), str(value), text_size)  # value on top of bar
        _draw_text(img, (cx, baseline + 0.1 * height), label, text_size)  # label under it
    draw.line((0, baseline, width - 1, baseline), fill=BLACK, width=max(1, height // 32))
    return img


def _render_prices(width: int, height: int, lines: tuple) -> Image.Image:
    img = Image.new("RGB", (width, height), WHITE)
    texts = [f"{shape} {price}" for shape, price in lines]
    line_h = height / len(lines)
    size = fit_size(max(texts, key=len), 0.88 * width, round(0.75 * line_h))
    for i, text in enumerate(texts):
        _draw_text(img, (0.06 * width, (i + 0.5) * line_h), text, size, anchor="lm")
    return img
