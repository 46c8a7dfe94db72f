"""The world's closed vocabulary: shapes, colours, words, question templates, facts, and the
caption and table targets built from them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .render import BAR_LABELS, COLORS

SHAPES = ("circle", "square", "triangle")


COLOR_QUESTIONS = ("What colour is the shape?", "What is the colour of the shape?",
                   "Which colour does the shape have?")
SHAPE_QUESTIONS = ("What shape is this?", "What shape is shown?", "Which shape is in the image?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes are in the image?",
                   "Count the shapes.")
CAPTION_QUESTIONS = ("Describe the image.", "What does the image show?")
TEXT_QUESTIONS = ("What word is written in the image?", "Read the word in the image.")
TABLE_QUESTIONS = ("Convert the table to Markdown.",)
GLYPHS_QUESTION = "Read the text in the image."
# the lookup task (training only): the question names one shape of the scene by an attribute
LOOKUP_SHAPE = "What shape is the {color} one?"
LOOKUP_COLOR = "What colour is the {shape}?"
LOOKUP_COUNT = "How many {plural} are there?"
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


# Facts for the text-only task (a fixed, ordered list; each fact is its own content key).

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


_INTERLEAVED_SENTENCES = (" is larger than it.", " is smaller than it.",
                          ", the same shape and size as the last one.",
                          ", the same size as the last one.")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_references(*, shape: str, color: str, size: str, cell: str, **_: Any) -> list[str]:
    """Four reference captions; the first is the canonical training target."""
    loc = location_phrase(cell)
    big = {"small": "little", "large": "big"}[size]
    return [f"a {size} {color} {shape} {loc}",
            f"there is a {size} {color} {shape} {loc}",
            f"the image shows a {big} {color} {shape} {loc}",
            f"{article(color)} {color} {shape} {loc}"]


def vocabulary_strings(tasks: list[str]) -> Iterator[str]:
    """Every template filled with every value the world can put in it (motion's only with motion)."""
    yield from COLOR_QUESTIONS + SHAPE_QUESTIONS + COUNT_QUESTIONS + CAPTION_QUESTIONS
    yield from TEXT_QUESTIONS + TABLE_QUESTIONS + (CHART_TALLEST,)
    yield from (CHART_VALUE.format(label=lab) for lab in BAR_LABELS)
    yield from (PRICE_QUESTION.format(plural=p) for p in PLURALS.values())
    if "glyphs" in tasks:
        yield GLYPHS_QUESTION
    if "lookup" in tasks:
        yield from (LOOKUP_SHAPE.format(color=c) for c in COLORS)
        yield from (LOOKUP_COLOR.format(shape=sh) for sh in SHAPES)
        yield from (LOOKUP_COUNT.format(plural=p) for p in PLURALS.values())
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
