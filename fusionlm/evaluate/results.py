"""One task's result, as every evaluation path reports it (``harness`` for answers, ``drawing`` for
pictures)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TaskResult:
    task: str
    metric: str
    score: float
    n: int
    shots: int = 0
    examples: list[dict] = field(default_factory=list)
    fewer_shots: int = 0  # questions asked with fewer examples, the full prompt being over the context
    skipped: list[str] = field(default_factory=list)  # ids of the questions not asked: over the context
    context: int = 0  # the model's context (tokens), which the skipped questions' prompts do not fit in
    extra: dict[str, float] = field(default_factory=dict)  # metric -> score: the task's other metrics, same answers

    def skip_reason(self) -> str:
        return f"the prompt does not fit the context of {self.context} tokens"
