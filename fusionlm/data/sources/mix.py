"""Named sources in one mixture: ``data.sources`` + ``mixture: {captions: 45, docs: 45, text: 10}``.

``MultiSource`` is a ``SampleSource`` whose "tasks" are the source names (draw from the whole
source) and ``name/task`` (one task of it), so ``MixtureBatches`` mixes sources by weight with its
usual contract: sample number -> (source, index) is a pure function, and a source's ``get`` reads
that one record.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ...errors import ConfigError
from ..sample import Sample

class MultiSource:
    """Several named sources; mixture names are source names or ``source/task``."""

    def __init__(self, sources: dict):
        if not sources:
            raise ConfigError("data.sources: name at least one source")
        self.sources = sources
        roots = [os.path.realpath(s.root) for s in sources.values() if s.root is not None]
        self.root = os.path.commonpath(roots) if roots else None  # every reader checked its own root already
        self.problems = [p for s in sources.values() for p in getattr(s, "problems", [])]

    def tasks(self) -> list[str]:
        return list(self.sources) + [f"{n}/{t}" for n, s in self.sources.items() for t in s.tasks()]

    def size(self, task: str) -> int | None:
        name, _, sub = task.partition("/")
        source = self.sources[name]
        if sub:
            return source.size(sub)
        sizes = [source.size(t) for t in source.tasks()]
        return None if None in sizes else sum(sizes)

    def row_groups(self, task: str) -> list[int] | None:
        """The sizes of the runs of consecutive indices a source decodes together (see ``get``'s
        layout: a whole source's tasks one after the other); None: any order is as cheap."""
        name, _, sub = task.partition("/")
        groups = getattr(self.sources[name], "row_groups", None)
        if groups is None:
            return None
        if sub:
            return groups(sub)
        parts = [groups(t) for t in self.sources[name].tasks()]
        return None if any(p is None for p in parts) else [n for p in parts for n in p]

    def get(self, task: str, split: str, index: int) -> Sample:
        name, _, sub = task.partition("/")
        source = self.sources[name]
        if sub:
            return source.get(sub, split, index)
        tasks = source.tasks()
        sizes = [source.size(t) for t in tasks]
        if None in sizes or sum(sizes) == 0:  # unlimited tasks: take them in turn
            return source.get(tasks[index % len(tasks)], split, index // len(tasks))
        index %= sum(sizes)
        for t, n in zip(tasks, sizes):
            if index < n:
                return source.get(t, split, index)
            index -= n
        raise AssertionError("unreachable")

    def corpus(self, per_task: int, tasks: list[str] | None = None) -> Iterator[str]:
        for name, source in self.sources.items():
            chosen = None if tasks is None else [t.partition("/")[2] or t for t in tasks if t.partition("/")[0] == name]
            if tasks is not None and not chosen:
                continue
            yield from source.corpus(per_task, None if chosen is None or name in (tasks or []) else chosen)
