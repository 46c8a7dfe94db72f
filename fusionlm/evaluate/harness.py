"""Evaluate a model per task: generate answers for a task's questions, zero- or k-shot, and score them.

Answers are generated greedily in batches with left padding; a sample's answer does not depend on
the batch it is in. k-shot prompts put k solved examples, their images interleaved with their
text, before the question (``data.fewshot``); the examples come from a split disjoint from the
questions (the world's val split, or the other samples of a file), drawn with a fixed seed, and
never include the question itself.

A question whose prompt does not fit the model's context (even with no examples) is skipped, not
answered: the task is scored on the others, and its ``TaskResult.skipped`` names the skipped ones.

A task's extra metrics (``EvalTask.extra_metrics``; the world's table task: cell F1 beside exact
match) score the same answers; they are reported beside the task's score (``TaskResult.extra``, a
row each in the table, ``extra_scores`` in the JSON, ``extra`` in each example), never instead of it.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from ..config import DataConfig
from ..data.batching.batches import ImageSpec, stable_seed
from ..data.prompt import PromptEncoder
from ..data.fewshot import few_shot
from ..data.sample import Sample
from ..data.sources import build_source
from ..errors import ConfigError
from ..generate import MAX_NEW_TOKENS, Request, generate
from .drawing import draw_task
from .metrics import GENEVAL, METRICS, extra_metrics_for, metric_for
from .results import TaskResult
from .tasks import WORLD_EVAL_TASKS, EvalTask

EVAL_TASKS = WORLD_EVAL_TASKS  # the world's tasks that are answered from images (motion: from a clip)
# tasks a source may hold that are not scored by default: text without a question, reading practice
# (``glyphs``) and finding what a question names (``lookup``), both for training only, drawing (scored by GenEval, for models that draw)
UNSCORED = ("interleaved", "text_only", "draw", "glyphs", "lookup", "position_words")


def question_of(sample) -> str:
    return next(m["content"] for m in reversed(sample.messages) if m["role"] == "user")


def request_of(sample: Sample, prompt: str = "{question}") -> Request:
    """The question of a (possibly multi-turn, few-shot) sample as a generation request."""
    turns = sample.messages[:-1] if sample.messages[-1]["role"] == "assistant" else sample.messages
    *history, last = turns
    return Request(prompt.format(question=last["content"]), list(sample.images), sample.id, history=history)


class TaskData:
    """The questions of one task, and the pool its k-shot examples are drawn from."""

    def __init__(self, task: EvalTask, sources: dict):
        key = (task.data, task.image_root)
        if key not in sources:
            sources[key] = build_source(DataConfig(source=task.data, image_root=task.image_root))
        self.task, self.source = task, sources[key]
        names = self.source.tasks()
        self.name = task.data_task if task.data_task in names or len(names) != 1 else names[0]
        if self.name not in names:
            raise ConfigError(f"task {task.name}: {task.data} has no task {self.name!r} (it has: {', '.join(names)})")
        self.size = self.source.size(self.name)  # None: as many as asked (the world)

    def questions(self, per_task: int) -> list[Sample]:
        n = per_task if self.size is None else min(per_task, self.size)
        samples = [self.source.get(self.name, self.task.split, i) for i in range(n)]
        return [s for s in samples if s.kind == "chat" and s.answers]

    def with_shots(self, sample: Sample, index: int, shots: int, seed: int) -> Sample:
        if shots == 0:
            return sample
        rng = random.Random(stable_seed(seed, self.task.name, index, "shots"))
        if self.size is None:  # the world: another split, so never the question itself
            pool = [self.source.get(self.name, self.task.shots_split, rng.randrange(10**6)) for _ in range(shots)]
        else:  # a file: the other samples
            others = [i for i in range(self.size) if i != index]
            pool = [self.source.get(self.name, "", i) for i in rng.sample(others, min(shots, len(others)))]
        return few_shot([s for s in pool if s.id != sample.id], sample)


def prompt_length(model, tokenizer, spec: ImageSpec, request: Request) -> int:
    """Decoder positions a request's prompt takes, images included."""
    return len(PromptEncoder.of(model, tokenizer, spec, max_length=10**9).request(request).encoded.input_ids)


def fit_shots(model, tokenizer, spec: ImageSpec, data: TaskData, sample: Sample, index: int, shots: int,
              seed: int) -> tuple[Sample, int, int]:
    """The question with as many of its ``shots`` examples as fit the context with its answer budget:
    (prompt, examples kept, the prompt's length)."""
    task, context = data.task, model.config.llm.max_length
    k = shots
    while True:
        prompt = data.with_shots(sample, index, k, seed)
        length = prompt_length(model, tokenizer, spec, request_of(prompt, task.prompt))
        if k == 0 or length + task.max_new_tokens <= context:
            return prompt, k, length
        k -= 1  # drop examples until the question and its answer fit


def evaluate_tasks(model, tokenizer, tasks: list[EvalTask], spec: ImageSpec, *, per_task: int = 50,
                   batch_size: int = 32, shots: int = 0, seed: int = 0, progress=None,
                   sources: dict | None = None) -> list[TaskResult]:
    """Score ``model`` on each task: greedy answers to ``per_task`` questions, ``shots`` examples each.

    A question whose prompt alone leaves no room in the context for an answer is skipped (listed in
    ``TaskResult.skipped``); the task is scored on the rest.
    """
    sources = dict(sources or {})
    max_length = model.config.llm.max_length
    results = []
    for task in tasks:
        if task.metric == GENEVAL:
            results += draw_task(model, tokenizer, task, spec, per_task=per_task, batch_size=batch_size, seed=seed,
                                 progress=progress)
            continue
        data = TaskData(task, sources)
        task_spec = replace(spec, root=data.source.root)  # the task's images, under its data's root
        questions, prompts, skipped, fewer = [], [], [], 0
        for i, s in enumerate(data.questions(per_task)):
            prompt, k, length = fit_shots(model, tokenizer, task_spec, data, s, i, shots, seed)
            if length >= max_length:
                skipped.append(s.id)
                continue
            fewer += k < shots
            questions.append(s)
            prompts.append(prompt)
        preds: list[str] = []
        for start in range(0, len(prompts), batch_size):
            reqs = [request_of(s, task.prompt) for s in prompts[start:start + batch_size]]
            preds.extend(generate(model, tokenizer, reqs, task_spec, max_new_tokens=task.max_new_tokens))
        refs = [s.answers for s in questions]
        score, per = METRICS.get(task.metric)(preds, refs)
        extra, extra_per = score_extra(task.extra_metrics, preds, refs)
        examples = [{"id": s.id, "question": question_of(s), "answer": p, "references": s.answers, "score": v}
                    for s, p, v in zip(questions, preds, per)]
        for example, scores in zip(examples, extra_per):
            example["extra"] = scores
        results.append(TaskResult(task.name, task.metric, score, len(questions), shots, examples, fewer, skipped,
                                  max_length, extra))
        if progress:
            note = f", skipped {len(skipped)} over the context" if skipped else ""
            also = "".join(f"; {name} {value:.3f}" for name, value in extra.items())
            progress(f"{task.name:<10} {task.metric:<18} {score:.3f}  (n={len(questions)}, {shots}-shot{note}{also})")
    return results


def score_extra(metrics: list[str], preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], list[dict]]:
    """The extra metrics on the same answers: ({metric: score}, per sample {metric: score}); with no
    extra metrics, ``({}, [])`` (the examples then carry no ``extra``)."""
    if not metrics:
        return {}, []
    scored = {name: METRICS.get(name)(preds, refs) for name in metrics}
    per = [{name: values[i] for name, (_, values) in scored.items()} for i in range(len(preds))]
    return {name: score for name, (score, _) in scored.items()}, per


def scored_tasks(source, *, draws: bool) -> list[str]:
    """The tasks of ``source`` that ``evaluate`` scores when none are named: all but ``UNSCORED``
    (``draw`` too, for a model that ``draws``)."""
    return [t for t in source.tasks() if t in EVAL_TASKS or t not in UNSCORED or (t == "draw" and draws)]


def evaluate(model, tokenizer, source, spec: ImageSpec, *, split: str = "test", per_task: int = 50,
                 batch_size: int = 32, tasks: list[str] | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                 shots: int = 0, seed: int = 0, progress=None) -> list[TaskResult]:
    """The tasks of a data source (the world's, or a file's) by name, each with its usual metric."""
    names = tasks or scored_tasks(source, draws=model.draws)
    data = getattr(source, "path", "synthetic")
    root = None if data == "synthetic" else source.root
    defs = [EvalTask(name=n, metric=metric_for(n), data=data, split=split, max_new_tokens=max_new_tokens,
                     image_root=root, extra_metrics=extra_metrics_for(n)) for n in names]
    return evaluate_tasks(model, tokenizer, defs, spec, per_task=per_task, batch_size=batch_size, shots=shots,
                          seed=seed, progress=progress, sources={(data, root): source})


def markdown_table(results: list[TaskResult]) -> str:
    """One row per task and shots, then one per extra metric of it (same task, shots and n)."""
    lines = ["| task | metric | shots | score | n |", "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        lines += [f"| {r.task} | {metric} | {r.shots} | {score:.3f} | {r.n} |"
                  for metric, score in [(r.metric, r.score), *r.extra.items()]]
    return "\n".join(lines)


def skipped_lines(results: list[TaskResult]) -> list[str]:
    """One line per task with skipped questions: how many, why, and which."""
    return [f"skipped: {r.task} ({r.shots}-shot): {len(r.skipped)} question(s), {r.skip_reason()}: "
            f"{', '.join(r.skipped)}" for r in results if r.skipped]


def write_results(results: list[TaskResult], path: str | Path, *, extra: dict | None = None) -> None:
    """``path`` (JSON: scores, counts, skipped questions, examples) and the same stem with ``.md``
    (the table, then a line per task with skipped questions).

    ``scores`` and ``metrics`` hold each task's own metric; ``extra_scores`` the others, for the tasks
    that have some: ``{"table": {"table_cell_f1": 0.412}}``."""
    path = Path(path)
    key = {id(r): r.task if r.shots == 0 else f"{r.task} ({r.shots}-shot)" for r in results}
    data = {"scores": {key[id(r)]: r.score for r in results}, "metrics": {key[id(r)]: r.metric for r in results},
            "n": {key[id(r)]: r.n for r in results}, "shots": {key[id(r)]: r.shots for r in results},
            "extra_scores": {key[id(r)]: dict(r.extra) for r in results if r.extra},
            "fewer_shots": {key[id(r)]: r.fewer_shots for r in results if r.fewer_shots},
            "skipped": {key[id(r)]: {"n": len(r.skipped), "reason": r.skip_reason(), "ids": r.skipped}
                        for r in results if r.skipped},
            **(extra or {}), "examples": {key[id(r)]: r.examples for r in results}}
    path.write_text(json.dumps(data, indent=1))
    notes = "".join(f"\n{line}\n" for line in skipped_lines(results))
    path.with_suffix(".md").write_text(markdown_table(results) + "\n" + notes)
