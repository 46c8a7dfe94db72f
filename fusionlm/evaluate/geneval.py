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

Shapes. From a blob's moments: its extent (area over bounding-box area: square ~1, disc pi/4,
triangle 1/2) and the height of its centroid in its box (an apex-up triangle's is at 2/3, the
others' at 1/2). A blob that is none of the three (a wrong aspect or extent) has no shape and
fails every prompt that counts it.
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
        axis = WHITE - np.asarray(rgb, dtype=np.float64)  # (3,)
        a = away @ axis / (axis @ axis)  # (H, W) coverage of this colour
        res = np.linalg.norm(away - a[..., None] * axis, axis=-1)  # (H, W) distance off the line
        nearer = (a > 0) & (a <= 1.5) & (res < best_res)
        best, best_res, best_a = np.where(nearer, i, best), np.where(nearer, res, best_res), np.where(nearer, a, best_a)
    return np.where((best_res <= tolerance) & (best_a >= 0.5), best, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a (H, W) boolean mask, each as a (H, W) boolean mask."""
    h, w = mask.shape
    none = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)  # (H, W)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        near = np.min([padded[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx]
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)  # (H, W)
        new = np.where(mask, near, none)
        if np.array_equal(new, labels):
            break
        labels = new
    return [labels == v for v in np.unique(labels[mask])]


def _shape(blob: np.ndarray) -> tuple[str | None, tuple[float, float], tuple[int, int, int, int]]:
    """The world shape a blob's moments describe, its centroid and its box."""
    ys, xs = np.nonzero(blob)
    left, top, right, bottom = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    w, h = right - left, bottom - top
    extent = len(xs) / (w * h)  # m00 over the box
    drop = (ys.mean() + 0.5 - top) / h  # m01/m00, as a fraction of the box's height
    shape = None
    if 0.7 <= w / h <= 1.43:
        if extent >= 0.86 and abs(drop - 0.5) < 0.06:
            shape = "square"
        elif 0.66 <= extent < 0.86 and abs(drop - 0.5) < 0.06:
            shape = "circle"
        elif 0.4 <= extent < 0.66 and drop >= 0.56:
            shape = "triangle"
    return shape, (xs.mean() + 0.5, ys.mean() + 0.5), (int(left), int(top), int(right), int(bottom))


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
            shape, center, box = _shape(blob)
            blobs.append(Blob(name, shape, int(blob.sum()), center, box))
            claimed |= blob
    near = np.pad(claimed, 1)
    near = np.max([near[1 + dy:near.shape[0] - 1 + dy, 1 + dx:near.shape[1] - 1 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)  # claimed, grown by a pixel
    ink = np.linalg.norm(WHITE - px, axis=-1) > tolerance  # (H, W) clearly not white
    for blob in _components(ink & ~near):
        if blob.sum() >= floor:
            _, center, box = _shape(blob)
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
