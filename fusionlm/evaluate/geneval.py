"""GenEval on the synthetic world, scored exactly: the world knows its renderer.

GenEval (Ghosh et al., 2023) checks a generated image against the clauses of its prompt with an
object detector. Here no detector is needed: world pictures are flat shapes of six known colours
on white, so :func:`find_objects` segments an image by the palette and names each blob's shape
from its moments, and :func:`check` tests every clause of a :class:`~fusionlm.data.world.scenes.Scene`
(shapes, counts, colours, the relation) and that nothing else is in the picture. Scores are per
category and overall (the mean of the six categories), as GenEval reports them.

Segmentation. A pixel belongs to palette colour c when it lies on the line from white to c
(``p = a*c + (1-a)*white``, residual at most ``tolerance``) with coverage ``a`` of at least 0.5,
which keeps anti-aliased edges with their shape. Each colour's pixels are split into 8-connected
blobs; blobs under ``min_area`` (1% of the image) are specks and ignored. Whatever is clearly not
white and not within a pixel of a palette blob is an *unrecognised* object, and fails every prompt.

Shapes. From a blob's moments and the world's own renderer: its soft area (m00 of its coverage)
and centroid (m10, m01) place an ideal square, disc and apex-up triangle of the same area, and the
blob is the one it overlaps best (soft intersection over union), if clearly: an overlap of at least
``MIN_MATCH`` that beats the next shape's by ``MIN_MARGIN``. Coverage counts a soft or spilled edge
by how much it covers, so a reconstruction whose edges bleed a pixel keeps its shape. A blob that
matches none clearly (a diamond, a box of the wrong aspect, an ellipse) has no shape and fails every
prompt that counts it. The checker is strict about blur: a Gaussian blur of 0.4 pixels on a 32-px
picture already fails about 13% of prompts (small triangles first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..data.world import render
from ..data.world.render import COLORS
from ..data.world.scenes import CATEGORIES, Scene, relation_holds

WHITE = np.array(render.WHITE, dtype=np.float64)
# A blob is the world shape it overlaps best (soft intersection over union) if that overlap is at
# least MIN_MATCH and beats the next shape's by MIN_MARGIN. Rendered world shapes reach 0.88 at
# 32 px (0.93 at 64), with a margin of 0.05 (0.10); a diamond, a 13x17 box, an ellipse or a
# downward triangle do not (tests/test_geneval.py).
MIN_MATCH, MIN_MARGIN = 0.85, 0.03


@dataclass(frozen=True)
class Blob:
    """One object found in an image: its colour, shape (None: not a world shape), pixel area,
    centroid ``(x, y)`` and bounding box ``(left, top, right, bottom)``, exclusive."""

    color: str | None
    shape: str | None
    area: int
    center: tuple[float, float]
    box: tuple[int, int, int, int]


@dataclass
class Verdict:
    """Whether an image satisfies its scene, and the clauses it fails."""

    ok: bool
    failed: list[str] = field(default_factory=list)
    objects: list[Blob] = field(default_factory=list)


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float64)[..., :3]  # (H, W, 3)


def _coverage(px: np.ndarray, tolerance: float) -> np.ndarray:
    """(H, W) index into ``COLORS`` of each pixel's palette colour, or -1: the colour whose line
    from white passes nearest, if near enough and covering at least half the pixel (a faint edge
    of one colour is nobody's, not a ring of the next colour along)."""
    away = WHITE - px  # (H, W, 3)
    best, best_res = np.full(px.shape[:2], -1), np.full(px.shape[:2], np.inf)
    best_a = np.zeros(px.shape[:2])
    for i, rgb in enumerate(COLORS.values()):
        a, axis = _along(px, rgb)  # (H, W) coverage of this colour, (3,)
        res = np.linalg.norm(away - a[..., None] * axis, axis=-1)  # (H, W) distance off the line
        nearer = (a > 0) & (a <= 1.5) & (res < best_res)
        best, best_res, best_a = np.where(nearer, i, best), np.where(nearer, res, best_res), np.where(nearer, a, best_a)
    return np.where((best_res <= tolerance) & (best_a >= 0.5), best, -1)


def _along(px: np.ndarray, rgb) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) each pixel's coverage by ``rgb`` (its position on the line from white, unclipped), and
    that line's direction (3,)."""
    axis = WHITE - np.asarray(rgb, dtype=np.float64)  # (3,)
    return (WHITE - px) @ axis / (axis @ axis), axis


def _neighbourhood(a: np.ndarray, fill) -> np.ndarray:
    """(9, H, W): ``a`` shifted to each of its 3x3 neighbours (``fill`` beyond the border)."""
    h, w = a.shape
    padded = np.pad(a, 1, constant_values=fill)
    return np.stack([padded[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a (H, W) boolean mask, each as a (H, W) boolean mask."""
    h, w = mask.shape
    none = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)  # (H, W)
    while True:
        new = np.where(mask, _neighbourhood(labels, none).min(0), none)  # (H, W)
        if np.array_equal(new, labels):
            break
        labels = new
    return [labels == v for v in np.unique(labels[mask])]


def _grow(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels (8-neighbourhood)."""
    for _ in range(steps):
        mask = _neighbourhood(mask, False).max(0)
    return mask


def _cover(px: np.ndarray, rgb) -> np.ndarray:
    """(H, W) how much of each pixel ``rgb`` covers, on its line from white, in [0, 1]."""
    return np.clip(_along(px, rgb)[0], 0, 1)


# Each world shape's diameter from its area, and its box centre from its centroid (render.py draws
# a square of side 0.88 d, a disc of diameter d, an apex-up triangle of base and height d).
_FITS = {
    "square": (lambda m: np.sqrt(m) / 0.88, 0.0),
    "circle": (lambda m: np.sqrt(4 * m / np.pi), 0.0),
    "triangle": (lambda m: np.sqrt(2 * m), -1 / 6),  # its centroid is d/6 below its box centre
}


def _shape(px: np.ndarray, blob: np.ndarray, color: str | None) -> tuple[str | None, tuple[float, float],
                                                                          tuple[int, int, int, int]]:
    """The world shape a blob is, its centroid and its box. The blob's coverage (soft, so that a
    blurred or shifted edge counts by how much it covers) is matched against each shape drawn by
    the world's own renderer with the blob's area and centroid; the best match names it if the
    soft overlap (intersection over union) is clearly the best (``MIN_MATCH``, ``MIN_MARGIN``)."""
    ys, xs = np.nonzero(blob)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    center = (xs.mean() + 0.5, ys.mean() + 0.5)
    if color is None:
        return None, center, box
    h, w = blob.shape
    cover = _cover(px, COLORS[color]) * _grow(blob, 2)  # (H, W) this blob's soft coverage
    mass = cover.sum()
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = (cover * xx).sum() / mass, (cover * yy).sum() / mass
    matches = {}
    for shape, (diameter, shift) in _FITS.items():
        d = diameter(mass)
        drawn = render.render_image(("shapes", w, h, ((shape, color, cx, cy + shift * d, d),)))
        ideal = _cover(_pixels(drawn), COLORS[color])  # (H, W)
        matches[shape] = np.minimum(cover, ideal).sum() / np.maximum(cover, ideal).sum()
    (second, _), (best, top) = sorted(matches.items(), key=lambda kv: kv[1])[-2:]
    clear = top >= MIN_MATCH and top - matches[second] >= MIN_MARGIN
    return (best if clear else None), center, box


def find_objects(image: Image.Image | np.ndarray, *, tolerance: float = 45.0,
                 min_area: float = 0.01) -> list[Blob]:
    """Every object in a picture of the world, largest first (``min_area``: a fraction of the image)."""
    px = _pixels(image)
    floor = max(4, round(min_area * px.shape[0] * px.shape[1]))
    index = _coverage(px, tolerance)
    names = list(COLORS)
    blobs: list[Blob] = []
    claimed = np.zeros(index.shape, dtype=bool)
    for i, name in enumerate(names):
        for blob in _components(index == i):
            if blob.sum() < floor:
                continue
            shape, center, box = _shape(px, blob, name)
            blobs.append(Blob(name, shape, int(blob.sum()), center, box))
            claimed |= blob
    near = _grow(claimed)  # claimed, grown by a pixel
    ink = np.linalg.norm(WHITE - px, axis=-1) > tolerance  # (H, W) clearly not white
    for blob in _components(ink & ~near):
        if blob.sum() >= floor:
            _, center, box = _shape(px, blob, None)
            blobs.append(Blob(None, None, int(blob.sum()), center, box))
    return sorted(blobs, key=lambda b: -b.area)


def check(scene: Scene, image: Image.Image | np.ndarray, **segmentation) -> Verdict:
    """Every clause of ``scene`` against ``image``; ``failed`` names the clauses that fail."""
    blobs = find_objects(image, **segmentation)
    failed: list[str] = []
    unknown = [b for b in blobs if b.color is None or b.shape is None]
    if unknown:
        failed.append(f"{len(unknown)} object(s) that are not a world shape")
    chosen: list[Blob] = []
    for want in scene.objects:
        fits = [b for b in blobs if b.shape == want.shape and want.color in (None, b.color) and b not in chosen]
        if len(fits) < want.count:
            failed.append(f"{want.phrase()}: found {len(fits)}")
        chosen += fits[:want.count]
    wanted = sum(w.count for w in scene.objects)
    known = len(blobs) - len(unknown)
    if known > wanted:
        failed.append(f"{known - wanted} object(s) more than the prompt asks for")
    if scene.relation and len(chosen) == 2:
        side = float(_pixels(image).shape[1])
        if not relation_holds(chosen[0].center, chosen[1].center, scene.relation, side):
            failed.append(f"{scene.objects[0].phrase()} is not {scene.relation} {scene.objects[1].phrase()}")
    return Verdict(not failed, failed, blobs)


def geneval(scenes: Sequence[Scene], images: Sequence[Image.Image | np.ndarray]) -> dict[str, float]:
    """The share of images that satisfy their scene, per category present and ``overall`` (the mean
    of the categories' scores, as GenEval reports it)."""
    if len(scenes) != len(images):
        raise ValueError(f"{len(scenes)} scenes but {len(images)} images")
    hits: dict[str, list[bool]] = {}
    for scene, image in zip(scenes, images):
        hits.setdefault(scene.category, []).append(check(scene, image).ok)
    scores = {c: float(np.mean(hits[c])) for c in CATEGORIES if c in hits}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores
