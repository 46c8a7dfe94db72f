"""What each task asks about a picture it draws: one function per task, ``(world, spec, rng, split)``,
that fills a ``SampleSpec`` with the question, answers and image keys. ``World.spec`` calls them
in ``TASK_MAKERS``; each draws from ``rng`` in a fixed order, so a sample is a pure function of
``(seed, split, task, index)``."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Protocol

from ..sample import IMAGE_TOKEN
from .scenes import draw_scene, training_scene
from .render import BAR_LABELS, COLORS, fit_size, text_width
from .spec import SampleSpec
from .vocabulary import (
    _INTERLEAVED_SENTENCES, CAPTION_QUESTIONS, CHART_TALLEST, CHART_VALUE, COLOR_QUESTIONS, COUNT_QUESTIONS,
    DIRECTIONS, FACTS, GLYPHS_QUESTION, HEADER_WORDS, LOOKUP_COLOR, LOOKUP_COUNT, LOOKUP_SHAPE, MOTION_FRAMES, MOTION_QUESTIONS, PLURALS, POSITION_WHERE, POSITION_YESNO,
    PRICE_QUESTION, RELATIONS, SHAPE_QUESTIONS, SHAPES, TABLE_QUESTIONS, TEXT_QUESTIONS, WORDS, article,
    caption_references, table_markdown,
)


class Canvas(Protocol):
    """What a task maker needs from the world (``World`` is one): its image side and the helpers
    that draw a key inside a split."""

    image_size: int

    def draw(self, rng: random.Random, split: str, make: Callable[[random.Random], Any]) -> Any: ...

    def single(self, rng: random.Random, split: str) -> tuple[tuple, dict]: ...

    def scatter(self, rng: random.Random, n: int, size_range: tuple[float, float],
                shapes: tuple[str, ...] = ...) -> tuple | None: ...


TASK_MAKERS: dict[str, Callable[[Canvas, SampleSpec, random.Random, str], None]] = {}


def task(make: Callable) -> Callable:
    TASK_MAKERS[make.__name__] = make
    return make



@task
def color(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    key, meta = world.single(rng, split)
    spec.image_keys, spec.meta = [key], meta
    spec.question, spec.answers = rng.choice(COLOR_QUESTIONS), [meta["color"]]


@task
def shape(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    key, meta = world.single(rng, split)
    spec.image_keys, spec.meta = [key], meta
    spec.question, spec.answers = rng.choice(SHAPE_QUESTIONS), [meta["shape"]]


@task
def caption(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    key, meta = world.single(rng, split)
    spec.image_keys, spec.meta = [key], meta
    spec.question, spec.answers = rng.choice(CAPTION_QUESTIONS), caption_references(**meta)


@task
def count(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    def make(rng):
        elems = world.scatter(rng, rng.randint(1, 5), (0.15, 0.24))
        return None if elems is None else (("shapes", world.image_size, world.image_size, elems), {})

    key, _ = world.draw(rng, split, make)
    spec.image_keys, spec.meta = [key], {"n": len(key[3])}
    spec.question, spec.answers = rng.choice(COUNT_QUESTIONS), [str(len(key[3]))]


@task
def lookup(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    """Finding what the question names, for training only: one hop from a word of the question to
    the shapes it picks out (the first step of position, price and a chart's value, which name a
    colour, a shape or a bar and ask about it). A scene of 2-3 shapes; "what shape is the red one?"
    and "what colour is the circle?" (the named attribute unique in the scene) or "how many circles
    are there?" (1-4 shapes, any kinds)."""
    S = world.image_size
    kind = rng.choice(("shape", "color", "count"))

    def make(rng):
        if kind == "count":
            elems = world.scatter(rng, rng.randint(1, 4), (0.18, 0.26))
        else:
            elems = world.scatter(rng, rng.randint(2, 3), (0.22, 0.30))
            unique = 1 if kind == "shape" else 0  # the attribute the question names: colour or shape
            if elems is not None and len({e[unique] for e in elems}) < len(elems):
                elems = None
        return None if elems is None else (("shapes", S, S, elems), {})

    key, _ = world.draw(rng, split, make)
    elems = key[3]
    named = rng.choice(elems)
    spec.image_keys, spec.meta = [key], {"kind": kind}
    if kind == "shape":
        spec.question, spec.answers = LOOKUP_SHAPE.format(color=named[1]), [named[0]]
    elif kind == "color":
        spec.question, spec.answers = LOOKUP_COLOR.format(shape=named[0]), [named[1]]
    else:
        spec.question = LOOKUP_COUNT.format(plural=PLURALS[named[0]])
        spec.answers = [str(sum(e[0] == named[0] for e in elems))]


@task
def position(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    S = world.image_size

    def make(rng):
        d = rng.randint(round(0.24 * S), round(0.32 * S))
        margin = max(1, round(0.03 * S))
        lo, hi = math.ceil(margin + d / 2), math.floor(S - margin - d / 2)
        sep, drift = math.ceil(0.45 * S), round(0.1 * S)
        a = rng.randint(lo, hi - sep)
        b = rng.randint(a + sep, hi)
        mid = rng.randint(max(lo, S // 2 - drift), min(hi, S // 2 + drift))
        cross = [min(max(mid + rng.randint(-drift, drift) // 2, lo), hi) for _ in range(2)]
        colors = rng.sample(list(COLORS), 2)  # colors[0] at the smaller coordinate
        horizontal = rng.random() < 0.5
        elems = []
        for c, main, other in zip(colors, (a, b), cross):
            cx, cy = (main, other) if horizontal else (other, main)
            elems.append((rng.choice(SHAPES), c, cx, cy, d))
        first_rel = "left" if horizontal else "above"  # relation of colors[0] to colors[1]
        return ("shapes", S, S, tuple(sorted(elems))), {"first": colors[0], "second": colors[1],
                                                       "first_rel": first_rel}

    key, meta = world.draw(rng, split, make)
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    if rng.random() < 0.5:
        target, ref, rel = meta["first"], meta["second"], meta["first_rel"]
    else:
        target, ref, rel = meta["second"], meta["first"], opposite[meta["first_rel"]]
    spec.image_keys, spec.meta = [key], {"target": target, "reference": ref, "relation": rel}
    if rng.random() < 0.5:
        spec.question, spec.answers = POSITION_WHERE.format(a=target, b=ref), [rel]
    else:
        truth = rng.random() < 0.5
        asked = rel if truth else rng.choice([r for r in RELATIONS if r != rel])
        spec.question = POSITION_YESNO.format(a=target, rel=RELATIONS[asked], b=ref)
        spec.answers = ["yes" if truth else "no"]


@task
def position_words(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    """The position question over its scene written as words, for training the LLM alone: the
    picture's 4 x 4 cells in reading order, one word each (the colour of the shape whose centre
    falls there, ``.`` elsewhere), where the image would be. A 64-pixel picture in 16-pixel
    patches gives its image tokens in the same cells and order, so a text-only stage can teach the
    hop from a named colour to where it stands before the image stages do (issue 17's experiment,
    ``experiments/reading/README.md``). For training only: the words are a coarse view of the scene,
    so scenes of two splits can read alike (a val or test sample may repeat a train one)."""
    position(world, spec, rng, split)
    S = world.image_size
    cells = ["."] * 16
    for _, color, cx, cy, _ in spec.image_keys[0][3]:
        cells[min(4 * cy // S, 3) * 4 + min(4 * cx // S, 3)] = color
    spec.image_keys = []
    spec.question = "".join(" " + c for c in cells) + "\n" + spec.question  # " red" as the question writes it


def _word_key(rng: random.Random, word: str, W: int, H: int, size: int) -> tuple:
    """The key of a ``W`` x ``H`` image of ``word`` at ``size`` px, its centre moved at random as
    far as keeps it inside."""
    jx = max(0, int((W - text_width(word, size)) / 2) - 1)
    jy = max(0, int((H - size) / 2))
    return ("word", W, H, word, size, W // 2 + rng.randint(-jx, jx), H // 2 + rng.randint(-jy, jy))


@task
def text(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    S = world.image_size
    W, H = 2 * S, S

    def make(rng):
        word = rng.choice(WORDS)
        size = round(fit_size(word, 0.9 * W, round(0.7 * H)) * rng.choice((0.75, 0.85, 1.0)))
        return _word_key(rng, word, W, H, size), {"word": word}

    key, meta = world.draw(rng, split, make)
    spec.image_keys, spec.meta = [key], meta
    spec.question, spec.answers = rng.choice(TEXT_QUESTIONS), [meta["word"]]


@task
def glyphs(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    """Reading practice, for training only: a word of the world (of the text task, a table's header,
    a shape's name) or a number from 0 to 99, at any text size the world's pictures use, from a
    chart's value (0.19 of the height) to the text task's largest word (0.7), anywhere."""
    S = world.image_size
    W, H = 2 * S, S

    def make(rng):
        text = rng.choice(WORDS + HEADER_WORDS + SHAPES) if rng.random() < 0.5 else str(rng.randint(0, 99))
        largest = fit_size(text, 0.9 * W, round(0.7 * H))
        size = rng.randint(min(largest, max(4, round(0.19 * H))), largest)
        return _word_key(rng, text, W, H, size), {"word": text}

    key, meta = world.draw(rng, split, make)
    spec.image_keys, spec.meta = [key], meta
    spec.question, spec.answers = GLYPHS_QUESTION, [meta["word"]]


@task
def table(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    S = world.image_size

    def make(rng):
        cols = rng.choice((2, 3))
        header = tuple(rng.sample(HEADER_WORDS, cols))
        values = tuple(rng.randint(0, 9) for _ in range(cols))
        return ("table", 2 * S, S, header, values), {"header": header, "values": values}

    key, meta = world.draw(rng, split, make)
    spec.image_keys, spec.meta = [key], meta
    spec.question = TABLE_QUESTIONS[0]
    spec.answers = [table_markdown(meta["header"], meta["values"])]


@task
def chart(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    S = world.image_size

    def make(rng):
        values = tuple(rng.sample(range(1, 10), 3))
        return ("chart", S * 3 // 2, S, rng.choice(list(COLORS)), values), {"values": values}

    key, meta = world.draw(rng, split, make)
    values = meta["values"]
    spec.image_keys, spec.meta = [key], meta
    if rng.random() < 0.5:
        spec.question = CHART_TALLEST
        spec.answers = [BAR_LABELS[values.index(max(values))].lower()]
    else:
        i = rng.randrange(3)
        spec.question, spec.answers = CHART_VALUE.format(label=BAR_LABELS[i]), [str(values[i])]


@task
def price(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    S = world.image_size

    def make_list(rng):
        lines = tuple((s, rng.randint(1, 5)) for s in rng.sample(SHAPES, 3))
        return ("prices", 2 * S, S, lines), {}

    def make_scene(rng):
        elems = world.scatter(rng, rng.randint(1, 4), (0.18, 0.26))
        return None if elems is None else (("shapes", S, S, elems), {})

    list_key, _ = world.draw(rng, split, make_list)
    scene_key, _ = world.draw(rng, split, make_scene)
    present = sorted({e[0] for e in scene_key[3]})
    target = rng.choice(present)
    count, price = sum(e[0] == target for e in scene_key[3]), dict(list_key[3])[target]
    spec.image_keys = [list_key, scene_key]
    spec.meta = {"shape": target, "count": count, "price": price}
    spec.question = PRICE_QUESTION.format(plural=PLURALS[target])
    spec.answers = [str(count * price)]


@task
def motion(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    S = world.image_size

    def make(rng):
        d = rng.randint(round(0.22 * S), round(0.3 * S))
        margin, gap = max(1, round(0.03 * S)), max(1, round(0.04 * S))
        lo, hi = math.ceil(margin + d / 2), math.floor(S - margin - d / 2)
        travel = math.ceil(0.4 * S)
        a = rng.randint(lo, hi - travel)
        b = rng.randint(a + travel, hi)
        cross = rng.randint(lo, hi)
        direction = rng.choice(DIRECTIONS)
        first, last = (a, b) if direction in ("right", "down") else (b, a)
        horizontal = direction in ("left", "right")
        start, end = ((first, cross), (last, cross)) if horizontal else ((cross, first), (cross, last))
        color = rng.choice(list(COLORS))
        # The circle's swept box; distractors keep a gap from it.
        x0, x1 = min(start[0], end[0]) - d / 2, max(start[0], end[0]) + d / 2
        y0, y1 = min(start[1], end[1]) - d / 2, max(start[1], end[1]) + d / 2
        others: list[tuple] = []
        for _ in range(rng.randint(1, 2)):
            e = rng.randint(max(4, round(0.15 * S)), round(0.22 * S))
            elo, ehi = math.ceil(margin + e / 2), math.floor(S - margin - e / 2)
            for _ in range(50):
                cx, cy = rng.randint(elo, ehi), rng.randint(elo, ehi)
                clear_path = (cx + e / 2 + gap <= x0 or cx - e / 2 - gap >= x1
                              or cy + e / 2 + gap <= y0 or cy - e / 2 - gap >= y1)
                if clear_path and all(max(abs(cx - o[2]), abs(cy - o[3])) >= (e + o[4]) / 2 + gap for o in others):
                    break
            else:
                return None
            others.append((rng.choice(("square", "triangle")), rng.choice([c for c in COLORS if c != color]),
                           cx, cy, e))
        key = ("motion", S, S, MOTION_FRAMES, color, d, start, end, tuple(sorted(others)))
        return key, {"direction": direction, "color": color, "start": start, "end": end,
                     "distractors": len(others)}

    key, meta = world.draw(rng, split, make)
    spec.image_keys, spec.meta = [key], meta
    spec.question, spec.answers = rng.choice(MOTION_QUESTIONS), [meta["direction"]]


@task
def interleaved(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    spec.kind = "document"
    items = [world.single(rng, split) for _ in range(rng.randint(2, 3))]
    style = rng.choice(("describe", "qa", "caption"))
    parts = []
    for i, (_, m) in enumerate(items):
        if style == "caption":
            sentence = caption_references(**m)[0] + "."
        elif style == "qa":
            q = rng.choice(("color", "shape"))
            question = COLOR_QUESTIONS[0] if q == "color" else SHAPE_QUESTIONS[0]
            sentence = f"{question} {m[q]}."
        elif i == 0:
            sentence = f"A {m['size']} {m['color']} {m['shape']}."
        else:
            prev = items[i - 1][1]
            subject = f"{article(m['color']).capitalize()} {m['color']} {m['shape']}"
            if m["size"] != prev["size"]:  # compare size classes, not 1-pixel differences
                rest = _INTERLEAVED_SENTENCES[0 if m["size"] == "large" else 1]
            else:
                rest = _INTERLEAVED_SENTENCES[2 if m["shape"] == prev["shape"] else 3]
            sentence = subject + rest
        parts.append(f"{IMAGE_TOKEN} {sentence}")
    spec.text = " ".join(parts)
    spec.image_keys = [k for k, _ in items]
    spec.meta = {"style": style, "items": [m for _, m in items]}


@task
def text_only(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    spec.kind = "document"
    facts = [world.draw(rng, split, lambda r: (("fact", r.choice(FACTS)), {}))[0][1]
             for _ in range(rng.randint(1, 3))]
    spec.text = " ".join(facts)
    spec.meta = {"facts": facts}


@task
def draw(world: Canvas, spec: SampleSpec, rng: random.Random, split: str) -> None:
    """Text to image: a GenEval-style prompt (never a held-out combination, ``scenes.HELD_OUT``)
    answered by a picture that satisfies it."""
    scene = training_scene(rng)
    key = world.draw(rng, split, lambda r: (draw_scene(scene, r, world.image_size), {}))[0]
    spec.question, spec.answers, spec.image_keys = scene.prompt, [scene.prompt], [key]
    spec.answer_images = True
    spec.meta = {"category": scene.category}
