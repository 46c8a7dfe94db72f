"""Sources held in memory: the synthetic world, and a LLaVA JSON or question JSONL file read whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError
from ..chat import check_placeholders
from ..sample import TASKS, Sample
from ..world import World
from .formats import read_llava_json, read_qa_jsonl


class WorldSource:
    """The procedurally generated world: unlimited samples per task and split."""

    root = None  # images are drawn in memory

    def __init__(self, image_size: int, seed: int):
        self.world = World(image_size=image_size, seed=seed)

    def corpus(self, per_task: int, tasks: list[str] | None = None) -> Iterator[str]:
        return self.world.corpus(per_task, tasks)

    def tasks(self) -> list[str]:
        return list(TASKS)

    def size(self, task: str) -> int | None:
        return None  # every task has as many samples as asked for

    def get(self, task: str, split: str, index: int) -> Sample:
        return self.world.sample(task, split, index)


class FileSource:
    """Samples read from a LLaVA-style JSON file; ``index`` wraps around each task's list.

    Every sample is validated when the file is read (placeholders against images, paths inside
    the data root), so a bad file fails before step 0.
    """

    def __init__(self, path: str | Path, image_root: str | None = None, *, fmt: str = "llava"):
        """``fmt``: ``llava`` (a JSON list of conversations) or ``qa`` (question JSON lines)."""
        self.path = str(path)
        reader = {"llava": read_llava_json, "qa": read_qa_jsonl}[fmt]
        samples = reader(path, image_root=image_root)
        if not samples:
            raise ConfigError(f"{path}: no samples")
        self.by_task: dict[str, list[Sample]] = {}
        for s in samples:
            check_placeholders(s)
            self.by_task.setdefault(s.task, []).append(s)
        self.root = image_root or str(Path(path).parent)

    def tasks(self) -> list[str]:
        return sorted(self.by_task)

    def corpus(self, per_task: int, tasks: list[str] | None = None) -> Iterator[str]:
        """All of the file's text (``per_task`` and ``tasks`` are for generated sources; a file is read whole)."""
        for items in self.by_task.values():
            for s in items:
                yield s.all_text()

    def size(self, task: str) -> int:
        return len(self.by_task[task])

    def get(self, task: str, split: str, index: int) -> Sample:
        items = self.by_task[task]
        return items[index % len(items)]
