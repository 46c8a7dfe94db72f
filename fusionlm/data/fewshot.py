"""Few-shot prompts: k solved examples, their images interleaved with their text, then a query.

The result is one multi-turn conversation: each example's question and answer are earlier turns,
the query's question the last user turn (and its answer the final assistant turn, so the same
sample trains or is scored). With Method B each text token sees only the images before it
(``fusion.visibility``), as in Flamingo's interleaved few-shot prompting.
"""

from __future__ import annotations

from ..errors import SampleError
from .sample import Sample


def few_shot(examples: list[Sample], query: Sample, *, sample_id: str | None = None) -> Sample:
    turns: list[dict[str, str]] = []
    images: list = []
    for item in [*examples, query]:
        roles = [m["role"] for m in item.messages]
        if item.kind != "chat" or roles != ["user", "assistant"]:
            raise SampleError(f"sample {item.id}: a few-shot item must be one question and its answer "
                              f"(got {item.kind} with turns {roles})")
        turns.extend(dict(m) for m in item.messages)
        images.extend(item.images)
    return Sample(id=sample_id or f"{query.id}/{len(examples)}-shot", task=query.task, messages=turns,
                  images=images, answers=list(query.answers))
