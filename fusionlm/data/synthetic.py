"""The embedded default data set and benchmark: a seeded, procedurally generated world.

Small images on a white background (large saturated shapes, rendered words, 2-row tables,
3-bar charts, price lists) with text targets, for every task in ``TASKS``. Everything is a pure
function of ``(seed, split, task, index)``.

Generation happens in two steps: :meth:`World.spec` draws the parameters of a sample (its
question, answers and one *image key* per image: a tuple that fully describes the picture),
and :func:`render_image` turns an image key into pixels. Image keys are the content keys used
for the split partition: each is assigned to a split by a stable hash (``sha256 % 10``: train
0-7, val 8, test 9) and redrawn until it lands in the requested split, so no picture (and no
text-only fact) ever appears in two splits, whatever task asks for it.

Question phrasings and answer formats (answers are lower case):

========== ================================================================= ==================
task       question (user turn = ``"<image>\\n" * n_images + question``)      answer
========== ================================================================= ==================
color      ``COLOR_QUESTIONS``                                               ``"red"``
shape      ``SHAPE_QUESTIONS``                                               ``"circle"``
count      ``COUNT_QUESTIONS``                                               ``"3"`` (1-5)
position   "Where is the red shape relative to the blue shape?"             left/right/above/below
           "Is the red shape left of|right of|above|below the blue shape?"  yes/no (balanced)
caption    ``CAPTION_QUESTIONS``                                             4 references, e.g.
                                                                             "a large red circle
                                                                             in the top left"
text       ``TEXT_QUESTIONS``                                                the word (``WORDS``)
table      "Convert the table to Markdown."                                 see :func:`table_markdown`
chart      "Which bar is the tallest?" / "What is the value of bar A?"      ``"b"`` / ``"4"``
price      "How much do all the circles cost?" (two images)                 ``"6"``
motion     ``MOTION_QUESTIONS`` (a clip: user turn ``"<video>\n" + question``) left/right/up/down
========== ================================================================= ==================

A ``motion`` sample's item is a :class:`~fusionlm.data.video.Video` of ``MOTION_FRAMES`` frames: one
circle moving in a straight line (at least 40% of the side, along one axis) over one or two
static squares/triangles of other colours that stay clear of its path; its key is the whole clip.

``interleaved`` and ``text_only`` are documents (``kind="document"``, no messages or answers).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


from fusionlm.data.render import BAR_LABELS, COLORS, fit_size, render_clip, render_image, text_width
from fusionlm.data.sample import IMAGE_TOKEN, TASKS, Sample
from fusionlm.data.video import Video, placeholder

SHAPES = ("circle", "square", "triangle")
SPLITS = ("train", "val", "test")
_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}


COLOR_QUESTIONS = ("What colour is the shape?", "What is the colour of the shape?",
                   "Which colour does the shape have?")
SHAPE_QUESTIONS = ("What shape is this?", "What shape is shown?", "Which shape is in the image?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes are in the image?",
                   "Count the shapes.")
CAPTION_QUESTIONS = ("Describe the image.", "What does the image show?")
TEXT_QUESTIONS = ("What word is written in the image?", "Read the word in the image.")
TABLE_QUESTIONS = ("Convert the table to Markdown.",)
POSITION_WHERE = "Where is the {a} shape relative to the {b} shape?"
POSITION_YESNO = "Is the {a} shape {rel} the {b} shape?"
RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
CHART_TALLEST = "Which bar is the tallest?"
CHART_VALUE = "What is the value of bar {label}?"
PRICE_QUESTION = "How much do all the {plural} cost?"
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
MOTION_QUESTIONS = ("Which way does the circle move?", "In which direction does the circle move?")
DIRECTIONS = ("left", "right", "up", "down")
MOTION_FRAMES = 8  # frames of a motion clip (model.video.frames samples them; 8 keeps every one)

# 3x3 grid: (column, row) -> name, and the phrase a caption uses for it.
GRID_NAMES = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right",
              (0, 1): "left", (1, 1): "center", (2, 1): "right",
              (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
_LOC_PHRASES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
                "right": "on the right"}


def location_phrase(cell_name: str) -> str:
    """``"top left"`` -> ``"in the top left"``, ``"top"`` -> ``"at the top"``, ``"left"`` -> ``"on the left"``."""
    return _LOC_PHRASES.get(cell_name, f"in the {cell_name}")


WORDS = (
    "cat", "dog", "sun", "map", "box", "cup", "hat", "pen", "bag", "bed", "car", "bus", "egg",
    "fox", "key", "leg", "man", "net", "owl", "pig", "rat", "sea", "toy", "van", "web", "zoo",
    "arm", "bee", "cow", "ear", "fan", "gum", "ink", "jar", "kid", "lid", "mug", "nut", "oak",
    "pie", "red", "sky", "tea", "art", "bat", "ice", "book", "tree", "fish", "bird", "cake",
    "door", "frog", "game", "hand", "home", "lamp", "milk", "moon", "nose", "park", "rain",
    "ring", "road", "rock", "rose", "salt", "ship", "shoe", "snow", "star", "time", "wind",
    "wolf", "blue", "gold", "king", "lake", "leaf", "lion", "bear", "boat", "coin", "duck",
    "apple", "bread", "chair", "cloud", "dance", "earth", "field", "glass", "grass", "heart",
    "horse", "house", "light", "money", "music", "night", "paper", "plant", "river", "stone",
    "table", "water",
)
HEADER_WORDS = ("cat", "dog", "sun", "box", "cup", "hat", "pen", "bag", "car", "bus", "egg",
                "fox", "key", "owl", "pig", "sea", "toy", "ice", "tea", "bee", "cow", "jar")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty")


def table_markdown(header: tuple[str, ...], values: tuple[int, ...]) -> str:
    """The exact target of the ``table`` task: header row, ``---`` separators, one data row.

    ``("cat", "dog"), (1, 2)`` -> ``"| cat | dog |\\n| --- | --- |\\n| 1 | 2 |"``.
    """
    row = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return "\n".join([row(header), row(["---"] * len(header)), row(values)])


# ---------------------------------------------------------------------------------------------
# Facts for the text-only task (a fixed, ordered list; each fact is its own content key)

def _build_facts() -> tuple[str, ...]:
    n = NUMBER_WORDS
    facts = ["a circle has no corners.", "a square has four corners.",
             "a triangle has three corners.", "a square has four sides.",
             "a triangle has three sides.", "a circle is round."]
    facts += [f"{c} is a colour." for c in COLORS] + [f"a {s} is a shape." for s in SHAPES]
    facts += [f"{a} and {b} are colours." for a in COLORS for b in COLORS if a != b]
    facts += [f"{n[a]} plus {n[b]} is {n[a + b]}." for a in range(10) for b in range(10)]
    facts += [f"{a} + {b} = {a + b}." for a in range(10) for b in range(10)]
    facts += [f"{n[a]} minus {n[b]} is {n[a - b]}." for a in range(10) for b in range(a + 1)]
    facts += [f"{a} times {b} is {a * b}." for a in range(1, 6) for b in range(1, 6)]
    facts += [f"{n[a]} is more than {n[b]}." for a in range(10) for b in range(a)]
    facts += [f"{n[b]} is less than {n[a]}." for a in range(10) for b in range(a)]
    facts += [f"{n[a + 1]} comes after {n[a]}." for a in range(20)]
    facts += [f"if one {s} costs {p}, {n[k]} {PLURALS[s]} cost {k * p}."
              for s in SHAPES for p in range(1, 6) for k in range(2, 5)]
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    facts += [f"if the {a} shape is {r} the {b} shape, the {b} shape is {opposite[r]} the {a} shape."
              for a in COLORS for b in COLORS if a != b for r in ("left of", "above")]
    return tuple(facts)


FACTS = _build_facts()


# ---------------------------------------------------------------------------------------------
# Parameters: (seed, split, task, index) -> SampleSpec

@dataclass
class SampleSpec:
    """A sample before rendering: its text, answers and one image key per image."""

    id: str
    task: str
    kind: str
    question: str = ""
    answers: list[str] = field(default_factory=list)
    text: str = ""
    image_keys: list[tuple] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def content_key(self) -> tuple:
        """Everything generated for this sample (never shared between splits)."""
        return (self.task, self.question, tuple(self.answers), self.text, tuple(self.image_keys))


def _stable_int(*parts: Any) -> int:
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


class World:
    """The synthetic world: ``World(image_size, seed).sample(task, split, index)``.

    Args:
        image_size: side of square scenes in pixels; word, table, chart and price-list images
            are ``2*image_size`` or ``1.5*image_size`` wide and ``image_size`` high.
        seed: changes every sample and the split partition.
    """

    def __init__(self, image_size: int = 64, seed: int = 0):
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.image_size = int(image_size)
        self.seed = int(seed)

    # -- public API ------------------------------------------------------------------------
    def spec(self, task: str, split: str, index: int) -> SampleSpec:
        """The parameters of a sample, without rendering its images (cheap)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        index = int(index)
        rng = random.Random(_stable_int("sample", self.seed, split, task, index))
        spec = SampleSpec(id=f"{split}/{task}/{index:06d}", task=task, kind="chat")
        getattr(self, f"_task_{task}")(spec, rng, split)
        return spec

    def sample(self, task: str, split: str, index: int) -> Sample:
        """A deterministic sample; unknown task or split -> ``ValueError`` naming the allowed ones."""
        spec = self.spec(task, split, index)
        images = [Video(render_clip(k)) if k[0] == "motion" else render_image(k) for k in spec.image_keys]
        if spec.kind == "document":
            return Sample(id=spec.id, task=task, kind="document", text=spec.text, images=images)
        user = "".join(placeholder(item) + "\n" for item in images)
        messages = [{"role": "user", "content": user + spec.question},
                    {"role": "assistant", "content": spec.answers[0]}]
        return Sample(id=spec.id, task=task, messages=messages, images=images,
                      answers=list(spec.answers))

    def corpus(self, n_per_task: int = 200, tasks: Iterable[str] | None = None) -> Iterator[str]:
        """Text for tokenizer training.

        Every question, answer (all caption references) and document (with its ``<image>``
        markers) of the first ``n_per_task`` train samples of each task, then the closed
        vocabulary of the world (all question templates filled, words, numbers, colours...) so
        that nothing in val/test is missing from a tokenizer trained on it. ``tasks``: only these
        (default: all), so a tokenizer is trained on the text of the tasks a recipe uses.
        """
        tasks = list(TASKS) if tasks is None else [t for t in TASKS if t in set(tasks)]
        for task in tasks:
            for i in range(n_per_task):
                spec = self.spec(task, "train", i)
                if spec.kind == "document":
                    yield spec.text
                else:
                    yield spec.question
                    yield from spec.answers
        yield from _vocabulary_strings(tasks)

    # -- helpers ---------------------------------------------------------------------------
    def _in_split(self, key: tuple, split: str) -> bool:
        return _stable_int("bucket", self.seed, key) % 10 in _BUCKETS[split]

    def _draw(self, rng: random.Random, split: str, make: Callable[[random.Random], Any]) -> Any:
        """Call ``make(rng) -> (key, meta) | None`` until its key falls in ``split``'s bucket."""
        for _ in range(10_000):
            made = make(rng)
            if made is not None and self._in_split(made[0], split):
                return made
        raise RuntimeError("could not draw a key for the split; is image_size too small?")

    def _single(self, rng: random.Random, split: str) -> tuple[tuple, dict]:
        """One shape (small: 30-36% of the side, large: 48-55%) in one of the 3x3 grid cells."""
        S = self.image_size

        def make(rng):
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            size = rng.choice(("small", "large"))
            lo, hi = (0.30, 0.36) if size == "small" else (0.48, 0.55)
            d = rng.randint(round(lo * S), round(hi * S))
            col, row = rng.randrange(3), rng.randrange(3)
            cx, cy = self._grid_coord(rng, d, col), self._grid_coord(rng, d, row)
            key = ("shapes", S, S, ((shape, color, cx, cy, d),))
            return key, {"shape": shape, "color": color, "size": size,
                         "cell": GRID_NAMES[(col, row)], "center": (cx, cy), "d": d}

        return self._draw(rng, split, make)

    def _grid_coord(self, rng: random.Random, d: int, i: int) -> int:
        """A centre coordinate in third ``i`` of the reachable range, jittered within it."""
        margin = max(1, round(0.03 * self.image_size))
        lo, hi = margin + d / 2, self.image_size - margin - d / 2
        spacing = (hi - lo) / 2
        jitter = int(0.2 * spacing)
        c = round(lo + i * spacing) + rng.randint(-jitter, jitter)
        return min(max(c, math.ceil(lo)), math.floor(hi))

    def _scatter(self, rng: random.Random, n: int, size_range: tuple[float, float],
                 shapes: tuple[str, ...] = SHAPES) -> tuple | None:
        """``n`` non-overlapping shapes of random kinds and colours (sorted), or None."""
        S = self.image_size
        margin, gap = max(1, round(0.03 * S)), max(1, round(0.04 * S))
        elems: list[tuple] = []
        for _ in range(n):
            d = rng.randint(max(4, round(size_range[0] * S)), round(size_range[1] * S))
            lo, hi = math.ceil(margin + d / 2), math.floor(S - margin - d / 2)
            for _ in range(50):
                cx, cy = rng.randint(lo, hi), rng.randint(lo, hi)
                if all(max(abs(cx - e[2]), abs(cy - e[3])) >= (d + e[4]) / 2 + gap for e in elems):
                    break
            else:
                return None
            elems.append((rng.choice(shapes), rng.choice(list(COLORS)), cx, cy, d))
        return tuple(sorted(elems))

    # -- tasks -----------------------------------------------------------------------------
    def _task_color(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        key, meta = self._single(rng, split)
        spec.image_keys, spec.meta = [key], meta
        spec.question, spec.answers = rng.choice(COLOR_QUESTIONS), [meta["color"]]

    def _task_shape(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        key, meta = self._single(rng, split)
        spec.image_keys, spec.meta = [key], meta
        spec.question, spec.answers = rng.choice(SHAPE_QUESTIONS), [meta["shape"]]

    def _task_caption(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        key, meta = self._single(rng, split)
        spec.image_keys, spec.meta = [key], meta
        spec.question, spec.answers = rng.choice(CAPTION_QUESTIONS), caption_references(**meta)

    def _task_count(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        def make(rng):
            elems = self._scatter(rng, rng.randint(1, 5), (0.15, 0.24))
            return None if elems is None else (("shapes", self.image_size, self.image_size, elems), {})

        key, _ = self._draw(rng, split, make)
        spec.image_keys, spec.meta = [key], {"n": len(key[3])}
        spec.question, spec.answers = rng.choice(COUNT_QUESTIONS), [str(len(key[3]))]

    def _task_position(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        S = self.image_size

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

        key, meta = self._draw(rng, split, make)
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

    def _task_text(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        S = self.image_size
        W, H = 2 * S, S

        def make(rng):
            word = rng.choice(WORDS)
            size = round(fit_size(word, 0.9 * W, round(0.7 * H)) * rng.choice((0.75, 0.85, 1.0)))
            jx = max(0, int((W - text_width(word, size)) / 2) - 1)
            jy = max(0, int((H - size) / 2))
            key = ("word", W, H, word, size, W // 2 + rng.randint(-jx, jx), H // 2 + rng.randint(-jy, jy))
            return key, {"word": word}

        key, meta = self._draw(rng, split, make)
        spec.image_keys, spec.meta = [key], meta
        spec.question, spec.answers = rng.choice(TEXT_QUESTIONS), [meta["word"]]

    def _task_table(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        S = self.image_size

        def make(rng):
            cols = rng.choice((2, 3))
            header = tuple(rng.sample(HEADER_WORDS, cols))
            values = tuple(rng.randint(0, 9) for _ in range(cols))
            return ("table", 2 * S, S, header, values), {"header": header, "values": values}

        key, meta = self._draw(rng, split, make)
        spec.image_keys, spec.meta = [key], meta
        spec.question = TABLE_QUESTIONS[0]
        spec.answers = [table_markdown(meta["header"], meta["values"])]

    def _task_chart(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        S = self.image_size

        def make(rng):
            values = tuple(rng.sample(range(1, 10), 3))
            return ("chart", S * 3 // 2, S, rng.choice(list(COLORS)), values), {"values": values}

        key, meta = self._draw(rng, split, make)
        values = meta["values"]
        spec.image_keys, spec.meta = [key], meta
        if rng.random() < 0.5:
            spec.question = CHART_TALLEST
            spec.answers = [BAR_LABELS[values.index(max(values))].lower()]
        else:
            i = rng.randrange(3)
            spec.question, spec.answers = CHART_VALUE.format(label=BAR_LABELS[i]), [str(values[i])]

    def _task_price(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        S = self.image_size

        def make_list(rng):
            lines = tuple((s, rng.randint(1, 5)) for s in rng.sample(SHAPES, 3))
            return ("prices", 2 * S, S, lines), {}

        def make_scene(rng):
            elems = self._scatter(rng, rng.randint(1, 4), (0.18, 0.26))
            return None if elems is None else (("shapes", S, S, elems), {})

        list_key, _ = self._draw(rng, split, make_list)
        scene_key, _ = self._draw(rng, split, make_scene)
        present = sorted({e[0] for e in scene_key[3]})
        target = rng.choice(present)
        count, price = sum(e[0] == target for e in scene_key[3]), dict(list_key[3])[target]
        spec.image_keys = [list_key, scene_key]
        spec.meta = {"shape": target, "count": count, "price": price}
        spec.question = PRICE_QUESTION.format(plural=PLURALS[target])
        spec.answers = [str(count * price)]

    def _task_motion(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        S = self.image_size

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

        key, meta = self._draw(rng, split, make)
        spec.image_keys, spec.meta = [key], meta
        spec.question, spec.answers = rng.choice(MOTION_QUESTIONS), [meta["direction"]]

    def _task_interleaved(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        spec.kind = "document"
        items = [self._single(rng, split) for _ in range(rng.randint(2, 3))]
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
                subject = f"{_a(m['color']).capitalize()} {m['color']} {m['shape']}"
                if m["size"] != prev["size"]:  # compare size classes, not 1-pixel differences
                    rest = _INTERLEAVED_SENTENCES[0 if m["size"] == "large" else 1]
                else:
                    rest = _INTERLEAVED_SENTENCES[2 if m["shape"] == prev["shape"] else 3]
                sentence = subject + rest
            parts.append(f"{IMAGE_TOKEN} {sentence}")
        spec.text = " ".join(parts)
        spec.image_keys = [k for k, _ in items]
        spec.meta = {"style": style, "items": [m for _, m in items]}

    def _task_text_only(self, spec: SampleSpec, rng: random.Random, split: str) -> None:
        spec.kind = "document"
        facts = [self._draw(rng, split, lambda r: (("fact", r.choice(FACTS)), {}))[0][1]
                 for _ in range(rng.randint(1, 3))]
        spec.text = " ".join(facts)
        spec.meta = {"facts": facts}


_INTERLEAVED_SENTENCES = (" is larger than it.", " is smaller than it.",
                          ", the same shape and size as the last one.",
                          ", the same size as the last one.")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_references(*, shape: str, color: str, size: str, cell: str, **_: Any) -> list[str]:
    """Four reference captions; the first is the canonical training target."""
    loc = location_phrase(cell)
    big = {"small": "little", "large": "big"}[size]
    return [f"a {size} {color} {shape} {loc}",
            f"there is a {size} {color} {shape} {loc}",
            f"the image shows a {big} {color} {shape} {loc}",
            f"{_a(color)} {color} {shape} {loc}"]


def _vocabulary_strings(tasks: list[str]) -> Iterator[str]:
    """Every template filled with every value the world can put in it (motion's only with motion)."""
    yield from COLOR_QUESTIONS + SHAPE_QUESTIONS + COUNT_QUESTIONS + CAPTION_QUESTIONS
    yield from TEXT_QUESTIONS + TABLE_QUESTIONS + (CHART_TALLEST,)
    yield from (CHART_VALUE.format(label=lab) for lab in BAR_LABELS)
    yield from (PRICE_QUESTION.format(plural=p) for p in PLURALS.values())
    if "motion" in tasks:
        yield from MOTION_QUESTIONS
        yield " ".join(DIRECTIONS)
    for a in COLORS:
        for b in COLORS:
            if a != b:
                yield POSITION_WHERE.format(a=a, b=b)
                yield from (POSITION_YESNO.format(a=a, rel=r, b=b) for r in RELATIONS.values())
    yield " ".join(COLORS)
    yield " ".join(SHAPES) + " " + " ".join(PLURALS.values())
    yield " ".join(list(RELATIONS) + ["yes", "no", "small", "large", "big", "little"])
    yield from (location_phrase(c) for c in GRID_NAMES.values())
    yield from _INTERLEAVED_SENTENCES
    yield " ".join(WORDS)
    yield " ".join(HEADER_WORDS)
    yield " ".join(NUMBER_WORDS)
    yield " ".join(str(i) for i in range(0, 101))
    yield " ".join(b.lower() for b in BAR_LABELS) + " " + " ".join(BAR_LABELS)
    yield table_markdown(("cat", "dog", "sun"), (1, 2, 3))
    yield " ".join(sorted({w.strip(".,") for fact in FACTS for w in fact.split()}))
