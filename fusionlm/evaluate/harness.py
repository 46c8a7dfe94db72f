"""Evaluate a model per task: generate answers for a split's samples and score them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.batches import ImageSpec
from ..generate import Request, generate
from .metrics import metric_for, score_task

# Tasks that are answered from images (motion: from a clip); interleaved documents and text-only
# samples are pre-training kinds with nothing to ask. Every task but caption and table is scored by
# exact match (``metrics.metric_for``).
EVAL_TASKS = ("caption", "color", "shape", "count", "position", "text", "table", "chart", "price", "motion")


@dataclass
class TaskResult:
    task: str
    metric: str
    score: float
    n: int
    examples: list[dict] = field(default_factory=list)


def question_of(sample) -> str:
    return next(m["content"] for m in sample.messages if m["role"] == "user")


def evaluate(model, tokenizer, source, images: ImageSpec, *, split: str = "test", per_task: int = 50,
             batch_size: int = 32, tasks: list[str] | None = None, max_new_tokens: int = 48,
             progress=None) -> list[TaskResult]:
    """Greedy answers for ``per_task`` samples of each task of ``split``, scored per task."""
    names = tasks or [t for t in source.tasks() if t in EVAL_TASKS or t not in ("interleaved", "text_only")]
    results = []
    for task in names:
        samples = [source.get(task, split, i) for i in range(per_task)]
        samples = [s for s in samples if s.kind == "chat" and s.answers]
        preds: list[str] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            reqs = [Request(question_of(s), s.images, s.id) for s in chunk]
            preds.extend(generate(model, tokenizer, reqs, images, max_new_tokens=max_new_tokens))
        refs = [s.answers for s in samples]
        score, per = score_task(task, preds, refs)
        examples = [{"id": s.id, "question": question_of(s), "answer": p, "references": s.answers, "score": v}
                    for s, p, v in zip(samples, preds, per)]
        results.append(TaskResult(task, metric_for(task), score, len(samples), examples))
        if progress:
            progress(f"{task:<10} {metric_for(task):<18} {score:.3f}  (n={len(samples)})")
    return results


def markdown_table(results: list[TaskResult]) -> str:
    lines = ["| task | metric | score | n |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r.task} | {r.metric} | {r.score:.3f} | {r.n} |" for r in results]
    return "\n".join(lines)


def write_results(results: list[TaskResult], path: str | Path, *, extra: dict | None = None) -> None:
    """``path`` (JSON: scores, counts, examples) and the same stem with ``.md`` (the table)."""
    path = Path(path)
    data = {"scores": {r.task: r.score for r in results}, "metrics": {r.task: r.metric for r in results},
            "n": {r.task: r.n for r in results}, **(extra or {}),
            "examples": {r.task: r.examples for r in results}}
    path.write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text(markdown_table(results) + "\n")
