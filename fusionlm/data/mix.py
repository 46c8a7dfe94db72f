"""Named sources in one mixture: ``data.sources`` + ``mixture: {captions: 45, docs: 45, text: 10}``.

``MultiSource`` is a ``SampleSource`` whose "tasks" are the source names (draw from the whole
source) and ``name/task`` (one task of it), so ``MixtureBatches`` mixes sources by weight with its
usual contract: sample number -> (source, index) is a pure function, and a source's ``get`` reads
that one record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..config import SOURCE_FORMATS as FORMATS
from ..errors import ConfigError
from .sample import Sample

def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its name (and a ``.jsonl`` file's first record)."""
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf"
        names = [f.name.lower() for f in p.iterdir()]
        for fmt, suffix in (("webdataset", ".tar"), ("parquet", ".parquet"), ("jsonl", ".jsonl")):
            if any(n.endswith(suffix) for n in names):
                return fmt
        raise ConfigError(f"{path}: no .tar, .parquet or .jsonl files and no save_to_disk state.json in this folder")
    suffix = p.suffix.lower()
    if suffix in (".tar", ".parquet"):
        return {".tar": "webdataset", ".parquet": "parquet"}[suffix]
    if suffix == ".jsonl":
        with open(p, "rb") as f:
            first = next((line for line in f if line.strip()), b"{}")
        try:
            return "qa" if "question" in json.loads(first) else "jsonl"
        except (ValueError, TypeError):
            return "jsonl"  # the bad line is reported when it is read
    return "llava"


def open_source(path: str, fmt: str = "auto", *, image_root: str | None = None, task: str | None = None,
                world_image_size: int = 64, world_seed: int = 0):
    """A source of samples for ``path`` in format ``fmt`` (one of ``FORMATS``)."""
    from .sources import FileSource, WorldSource
    from .streams import ArrowFolder, JsonLines, ParquetRows, TarShards

    if fmt == "synthetic":
        return WorldSource(world_image_size, world_seed)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file or folder")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt in ("llava", "qa"):
        return FileSource(path, image_root)
    readers = {"webdataset": TarShards, "parquet": ParquetRows, "jsonl": JsonLines, "hf": ArrowFolder}
    if fmt not in readers:
        raise ConfigError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    return readers[fmt](path, task) if task else readers[fmt](path)


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


def build_sources(data) -> MultiSource:
    """The ``MultiSource`` of a ``DataConfig`` whose ``sources`` is set."""
    return MultiSource({name: open_source(spec.path, spec.format, image_root=spec.image_root, task=spec.task,
                                          world_image_size=data.world_image_size, world_seed=data.world_seed)
                        for name, spec in data.sources.items()})
