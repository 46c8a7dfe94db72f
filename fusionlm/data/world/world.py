"""The embedded default data set and benchmark: a seeded, procedurally generated world.

Small images on a white background (large saturated shapes, rendered words, 2-row tables,
3-bar charts, price lists) with text targets, for every task in ``TASKS``. Everything is a pure
function of ``(seed, split, task, index)``.

Generation happens in two steps: :meth:`World.spec` draws the parameters of a sample (its
question, answers and one *image key* per image: a tuple that fully describes the picture),
and :func:`~fusionlm.data.world.render.render_image` turns an image key into pixels. Image keys are the content keys used
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

A ``motion`` sample's item is a :class:`~fusionlm.data.pixels.video.Video` of ``MOTION_FRAMES`` frames: one
circle moving in a straight line (at least 40% of the side, along one axis) over one or two
static squares/triangles of other colours that stay clear of its path; its key is the whole clip.

``interleaved`` and ``text_only`` are documents (``kind="document"``, no messages or answers).
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..sample import TASKS, Sample
from ..pixels.video import Video, placeholder
from .render import COLORS, render_clip, render_image
from .spec import SampleSpec, _stable_int
from .scenes import geneval_scenes
from .tasks import TASK_MAKERS
from .vocabulary import GRID_NAMES, SHAPES, vocabulary_strings

SPLITS = ("train", "val", "test")
_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}


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
        TASK_MAKERS[task](self, spec, rng, split)
        return spec

    def sample(self, task: str, split: str, index: int) -> Sample:
        """A deterministic sample; unknown task or split -> ``ValueError`` naming the allowed ones."""
        spec = self.spec(task, split, index)
        images = [Video(render_clip(k)) if k[0] == "motion" else render_image(k) for k in spec.image_keys]
        if spec.kind == "document":
            return Sample(id=spec.id, task=task, kind="document", text=spec.text, images=images)
        shown = "".join(placeholder(item) + "\n" for item in images)
        if spec.answer_images:  # text to image: the pictures are the assistant's answer
            messages = [{"role": "user", "content": spec.question},
                        {"role": "assistant", "content": shown.rstrip("\n")}]
        else:
            messages = [{"role": "user", "content": shown + spec.question},
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
        yield from vocabulary_strings(tasks)
        if "draw" in tasks:  # the evaluation prompts' words (their held-out combinations are of known words)
            yield from (s.prompt for s in geneval_scenes(20))

    # -- drawing, for the task makers (``tasks``) -------------------------------------------
    def _in_split(self, key: tuple, split: str) -> bool:
        return _stable_int("bucket", self.seed, key) % 10 in _BUCKETS[split]

    def draw(self, rng: random.Random, split: str, make: Callable[[random.Random], Any]) -> Any:
        """Call ``make(rng) -> (key, meta) | None`` until its key falls in ``split``'s bucket."""
        for _ in range(10_000):
            made = make(rng)
            if made is not None and self._in_split(made[0], split):
                return made
        raise RuntimeError("could not draw a key for the split; is image_size too small?")

    def single(self, rng: random.Random, split: str) -> tuple[tuple, dict]:
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

        return self.draw(rng, split, make)

    def _grid_coord(self, rng: random.Random, d: int, i: int) -> int:
        """A centre coordinate in third ``i`` of the reachable range, jittered within it."""
        margin = max(1, round(0.03 * self.image_size))
        lo, hi = margin + d / 2, self.image_size - margin - d / 2
        spacing = (hi - lo) / 2
        jitter = int(0.2 * spacing)
        c = round(lo + i * spacing) + rng.randint(-jitter, jitter)
        return min(max(c, math.ceil(lo)), math.floor(hi))

    def scatter(self, rng: random.Random, n: int, size_range: tuple[float, float],
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
