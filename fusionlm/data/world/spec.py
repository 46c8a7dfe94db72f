"""A sample before rendering, and the stable hash that draws and partitions it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


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
    answer_images: bool = False  # the images are the answer (drawn in the assistant turn), not the question's
    meta: dict[str, Any] = field(default_factory=dict)

    def content_key(self) -> tuple:
        """Everything generated for this sample (never shared between splits)."""
        return (self.task, self.question, tuple(self.answers), self.text, tuple(self.image_keys))


def _stable_int(*parts: Any) -> int:
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")
