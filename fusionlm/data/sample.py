"""The one in-memory form every data source is turned into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # marks a ``video.Video`` item; it becomes one image layout per pooled frame group

# Task families of the synthetic world; names are used everywhere (mixtures, metrics, reports).
TASKS = (
    "caption", "color", "shape", "count", "position", "text", "table", "chart", "price", "motion",
    "interleaved", "text_only", "draw", "glyphs", "lookup", "position_words",
)


@dataclass
class Sample:
    """One training or evaluation example.

    Attributes:
        id: unique id, e.g. ``"train/color/000123"``; named in every error about this sample.
        task: a task family (one of ``TASKS`` for the synthetic world; free text for user data).
        kind: ``"chat"`` (loss on assistant turns only) or ``"document"`` (loss on all text).
        messages: for chat: ``[{"role": "user"|"assistant", "content": str}, ...]``.
        text: for documents: the whole text.
        images: ``PIL.Image.Image`` objects or file paths, in the order their ``<image>``
            markers appear in the text; a clip is a ``video.Video`` item, marked by ``<video>``
            (placeholders and items are matched in order).
        answers: reference answers for evaluation (several for captions); the first is the
            one used as the training target.
        null: a drawing sample as its null prompt (``data.drawing.null_prompt``), which the
            model's ``model.generation.null_prompt`` says how to write.
    """

    id: str
    task: str
    kind: str = "chat"
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str = ""
    images: list[Any] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    null: bool = False

    def all_text(self) -> str:
        """Every piece of text in the sample (for tokenizer training and placeholder checks)."""
        if self.kind == "document":
            return self.text
        return "\n".join(m["content"] for m in self.messages)
