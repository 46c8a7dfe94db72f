"""The synthetic world: a seeded, procedurally generated data set and benchmark (``World``).

``vocabulary`` holds what it can say, ``tasks`` what each task asks about the picture it draws,
``world`` the ``World`` that draws samples by ``(seed, split, task, index)`` and partitions them
into splits, ``render`` the pixels of an image key, ``scenes`` the text-to-image prompts (GenEval's
categories, with held-out combinations) and pictures that satisfy them.
"""

from .render import COLORS
from .spec import SampleSpec
from .vocabulary import MOTION_FRAMES, SHAPES, WORDS, caption_references, location_phrase, table_markdown
from .world import SPLITS, World

__all__ = ["COLORS", "MOTION_FRAMES", "SHAPES", "SPLITS", "WORDS", "SampleSpec", "World", "caption_references",
           "location_phrase", "table_markdown"]
