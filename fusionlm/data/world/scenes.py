"""Text-to-image prompts of the synthetic world, in GenEval's six categories, and pictures that
satisfy them.

A :class:`Scene` is what a prompt asks for (objects, their shapes, colours and counts, and one
relation between two of them); ``scene.prompt`` is its text ("a red circle and a blue square").
:func:`draw_scene` draws an image key that satisfies it (a training target, or a reference image);
:func:`fusionlm.evaluate.geneval.check` decides whether any picture does.

Held-out combinations (``HELD_OUT``) never appear in a training prompt (:func:`training_scene`),
and every evaluation prompt of a category that has them contains at least one
(:func:`geneval_scenes`), so a model cannot pass by replaying prompts it was trained on. Two
categories have too few combinations to hold any out (three shapes: ``single_object`` asks for
one of 3, ``two_object`` for one of 3 pairs); their prompts are shared, and what is new at
evaluation time is only the layout, which any layout passes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .render import COLORS
from .vocabulary import NUMBER_WORDS, PLURALS, SHAPES, article

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "above")  # objects[0] <relation> objects[1]
COUNTS = (2, 3, 4)

HELD_OUT = {
    # (colour, shape) bindings: colors, color_attr
    "bindings": frozenset({("purple", "circle"), ("yellow", "circle"), ("orange", "square"), ("red", "square"),
                           ("green", "triangle"), ("blue", "triangle")}),
    # (count, shape): counting
    "counts": frozenset({(3, "circle"), (4, "square"), (2, "triangle")}),
    # (shape, relation, shape): position
    "relations": frozenset({("triangle", "left of", "circle"), ("square", "above", "triangle"),
                            ("circle", "above", "square")}),
}


@dataclass(frozen=True)
class Wanted:
    """``count`` objects of ``shape``, all of ``color`` (None: any colour)."""

    shape: str
    count: int = 1
    color: str | None = None

    def phrase(self) -> str:
        if self.count > 1:
            return f"{NUMBER_WORDS[self.count]} {PLURALS[self.shape]}"
        words = f"{self.color} {self.shape}" if self.color else self.shape
        return f"{article(words)} {words}"


@dataclass(frozen=True)
class Scene:
    """What one prompt asks for; ``relation`` ties ``objects[0]`` to ``objects[1]``."""

    category: str
    objects: tuple[Wanted, ...]
    relation: str | None = None

    @property
    def prompt(self) -> str:
        a = [w.phrase() for w in self.objects]
        if self.relation:
            return f"{a[0]} {self.relation} {a[1]}"
        return " and ".join(a)

    def held_out(self) -> bool:
        """Whether the prompt holds a combination kept out of training."""
        if any((w.color, w.shape) in HELD_OUT["bindings"] for w in self.objects):
            return True
        if self.category == "counting" and (self.objects[0].count, self.objects[0].shape) in HELD_OUT["counts"]:
            return True
        return bool(self.relation) and \
            (self.objects[0].shape, self.relation, self.objects[1].shape) in HELD_OUT["relations"]


def _draw(category: str, rng: random.Random) -> Scene:
    colors, shapes = list(COLORS), list(SHAPES)
    if category == "single_object":
        return Scene(category, (Wanted(rng.choice(shapes)),))
    if category == "counting":
        return Scene(category, (Wanted(rng.choice(shapes), rng.choice(COUNTS)),))
    if category == "colors":
        return Scene(category, (Wanted(rng.choice(shapes), color=rng.choice(colors)),))
    a, b = rng.sample(shapes, 2)
    if category == "two_object":
        return Scene(category, (Wanted(a), Wanted(b)))
    if category == "position":
        return Scene(category, (Wanted(a), Wanted(b)), rng.choice(RELATIONS))
    if category == "color_attr":
        ca, cb = rng.sample(colors, 2)
        return Scene(category, (Wanted(a, color=ca), Wanted(b, color=cb)))
    raise ValueError(f"unknown GenEval category {category!r}; allowed: {', '.join(CATEGORIES)}")


def _has_held_out(category: str) -> bool:
    return category not in ("single_object", "two_object")


def scene(category: str, rng: random.Random, *, held_out: bool) -> Scene:
    """A random scene of ``category`` whose prompt holds a held-out combination (``held_out``) or
    none (categories without any: any scene)."""
    for _ in range(1000):
        s = _draw(category, rng)
        if not _has_held_out(category) or s.held_out() == held_out:
            return s
    raise AssertionError(f"no {category} scene with held_out={held_out}")  # pragma: no cover


def training_scene(rng: random.Random) -> Scene:
    """A scene for a training prompt: any category, never a held-out combination."""
    return scene(rng.choice(CATEGORIES), rng, held_out=False)


def geneval_scenes(per_category: int = 50, seed: int = 0) -> list[Scene]:
    """The evaluation prompts: ``per_category`` of each category, in order, held-out where a
    category has held-out combinations."""
    rng = random.Random(f"geneval/{seed}")
    return [scene(c, rng, held_out=True) for c in CATEGORIES for _ in range(per_category)]


def _palette(rng: random.Random, w: Wanted, named: set[str]) -> str:
    """The colour of one object that asks for ``w``: its own, or one the prompt does not name (so
    that an unnamed object never looks like a named one); held-out bindings are never drawn unasked."""
    if w.color:
        return w.color
    return rng.choice([c for c in COLORS if c not in named and (c, w.shape) not in HELD_OUT["bindings"]])


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, side: float, *,
                   ahead: float = 0.15, slant: float = 1.0) -> bool:
    """Centre ``a`` is ``relation`` centre ``b``: ahead of it along the relation's axis by ``ahead``
    of the side, and off that axis by at most ``slant`` times as much. The checker uses the
    defaults; drawing asks for twice the lead and half the slant, so a drawn picture passes clearly."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = (dx, dy) if relation == "left of" else (dy, dx)
    return along >= ahead * side and abs(across) <= slant * along


def draw_scene(scene: Scene, rng: random.Random, size: int) -> tuple:
    """A ``("shapes", size, size, elems)`` image key that satisfies ``scene``: shapes of 24-34% of
    the side (one object: 30-50%), apart from each other and from the border."""
    wanted = [w for w in scene.objects for _ in range(w.count)]
    lo, hi = (0.30, 0.50) if len(wanted) == 1 else (0.24, 0.34)
    margin, gap = max(1, round(0.03 * size)), max(2, round(0.06 * size))
    for _ in range(10_000):
        elems: list[tuple] = []
        named = {w.color for w in wanted if w.color}
        for w in wanted:
            d = rng.randint(round(lo * size), round(hi * size))
            low, high = math.ceil(margin + d / 2), math.floor(size - margin - d / 2)
            cx, cy = rng.randint(low, high), rng.randint(low, high)
            if any(max(abs(cx - e[2]), abs(cy - e[3])) < (d + e[4]) / 2 + gap for e in elems):
                break
            elems.append((w.shape, _palette(rng, w, named), cx, cy, d))
        else:
            centres = [e[2:4] for e in elems[:2]]
            if scene.relation and not relation_holds(*centres, scene.relation, size, ahead=0.3, slant=0.5):
                continue
            return ("shapes", size, size, tuple(elems))
    raise ValueError(f"cannot draw {scene.prompt!r} at {size} pixels")
