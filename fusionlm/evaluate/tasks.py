"""Evaluation tasks as data: where the samples come from, how each is asked, how it is scored.

A task file is YAML, a list of entries with the keys of ``EvalTask``::

    - {name: chartqa-mini, data: eval/chart.jsonl, metric: vqa_accuracy, prompt: "{question} Answer briefly."}
    - {name: color, data: synthetic, metric: exact_match}
    - {name: table, data: synthetic, metric: table_exact_match, extra_metrics: [table_cell_f1]}

``data`` is ``synthetic`` (the world's task of the same name, or ``task``) or a LLaVA-style JSON
or question JSONL file (``fusionlm.data.sources.formats``). The synthetic world's test split ships as
built-in tasks (``builtin_tasks``), each with its metric and the extra metrics reported beside it
(``metrics.extra_metrics_for``: the table task's cell F1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import from_dict
from ..errors import ConfigError
from ..generate import MAX_NEW_TOKENS
from .metrics import extra_metrics_for, metric_for

WORLD_EVAL_TASKS = ("caption", "color", "shape", "count", "position", "text", "table", "chart", "price", "motion")


@dataclass
class EvalTask:
    name: str
    metric: str
    data: str = "synthetic"
    task: str | None = None  # the task inside the data (default: ``name``; a file with one task: that one)
    prompt: str = "{question}"  # template for the last question of a sample
    split: str = "test"  # the world's split the questions come from (files: the whole file)
    shots_split: str = "val"  # the world's split k-shot examples come from (files: the other samples)
    image_root: str | None = None
    max_new_tokens: int = MAX_NEW_TOKENS  # the answer budget (``generate.MAX_NEW_TOKENS`` unless the task sets one)
    extra_metrics: list[str] = field(default_factory=list)  # scored on the same answers, reported beside ``metric``

    @property
    def data_task(self) -> str:
        return self.task or self.name


def builtin_tasks(names: list[str] | None = None) -> list[EvalTask]:
    """The synthetic world's test split, one task per family, each with its metric."""
    names = names or list(WORLD_EVAL_TASKS)
    unknown = [n for n in names if n not in WORLD_EVAL_TASKS]
    if unknown:
        raise ConfigError(f"unknown built-in task {unknown[0]!r} (built-in: {', '.join(WORLD_EVAL_TASKS)})")
    return [EvalTask(name=n, metric=metric_for(n), extra_metrics=extra_metrics_for(n)) for n in names]


def load_task_file(path: str | Path) -> list[EvalTask]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the task file ({exc})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of tasks")
    tasks = []
    for i, entry in enumerate(data):
        missing = [k for k in ("name", "metric") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ConfigError(f"{path}: task {i}: missing key {missing[0]!r}")
        try:
            task = from_dict(entry, EvalTask)
        except ConfigError as exc:
            raise ConfigError(f"{path}: task {i}: {exc}") from None
        if "{question}" not in task.prompt:
            raise ConfigError(f"{path}: task {i} ({task.name}): prompt must contain {{question}}")
        if task.data != "synthetic" and not Path(task.data).is_absolute():
            task.data = str(path.parent / task.data)  # a file is relative to the task file
        tasks.append(task)
    return tasks
