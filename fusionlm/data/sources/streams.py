"""Datasets too large to read whole: webdataset tar shards, parquet, JSON lines, ``save_to_disk`` folders.

Each source is indexed once when opened, reading only small metadata (tar headers, parquet
footers, line offsets, Arrow batch lengths), never the data itself; ``record(i)`` then reads record
``i`` alone (one byte range, one row group, one line). Memory stays bounded by the index (a few
integers per record) whatever the dataset's size. A broken record is a ``SampleError`` naming the
file and the record; a broken shard or file found while indexing is listed in ``problems`` and
the rest of the data is used.
"""

from __future__ import annotations

import bisect
import json
import os
import tarfile
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import ConfigError, SampleError
from ..sample import Sample
from .rows import CAPTION_KEYS, IMAGE_KEYS, row_sample


def _read_range(path: str, offset: int, size: int) -> bytes:
    """The bytes ``offset … offset+size`` of ``path`` (the one place tar members are read)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def data_files(path: str | Path, suffixes: tuple[str, ...]) -> list[str]:
    """``path`` itself, or the files directly inside the folder ``path`` with one of ``suffixes``, sorted."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise ConfigError(f"{path}: no such file or folder")
    files = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.lower().endswith(suffixes))
    if not files:
        raise ConfigError(f"{path}: no {' / '.join(suffixes)} files in this folder")
    return files


class StreamSource:
    """A dataset of ``len(self)`` records read one at a time, all of one task."""

    task = "custom"
    root: str
    problems: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, i: int) -> Sample:
        raise NotImplementedError

    def tasks(self) -> list[str]:
        return [self.task]

    def size(self, task: str) -> int:
        return len(self)

    def row_groups(self, task: str) -> list[int] | None:
        """The sizes of the runs of consecutive records decoded together; None: each is read alone."""
        return None

    def get(self, task: str, split: str, index: int) -> Sample:
        if not len(self):
            raise SampleError(f"{self.root}: no readable records")
        return self.record(index % len(self))

    def corpus(self, per_task: int, tasks: list[str] | None = None) -> Iterator[str]:
        """The text of the first ``per_task`` readable records (a stream is never read whole)."""
        for i in range(min(per_task, len(self))):
            try:
                yield self.record(i).all_text()
            except SampleError:
                continue


class TarShards(StreamSource):
    """img2dataset / webdataset shards: members ``key.jpg`` + ``key.txt`` and/or ``key.json``."""

    def __init__(self, path: str | Path, task: str = "caption"):
        self.shards = data_files(path, (".tar",))
        self.root, self.task, self.problems = str(Path(path) if Path(path).is_dir() else Path(path).parent), task, []
        self.records: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for s, shard in enumerate(self.shards):
            self._index(s, shard)

    def _index(self, s: int, shard: str) -> None:
        size, groups = os.path.getsize(shard), {}
        try:
            with tarfile.open(shard, "r:") as tar:  # uncompressed: headers are read, data is seeked over
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        self.problems.append(f"{shard}: cut in member {member.name!r}; the samples after it are left out")
                        break
                    folder, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")  # webdataset: the key ends at the first dot
                    key = f"{folder}/{stem}" if folder else stem
                    groups.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
                tar.members = []  # the headers are not kept
        except (tarfile.TarError, OSError) as e:
            self.problems.append(f"{shard}: unreadable tar ({e}); the samples after the damage are left out")
        self.records.extend((s, key, parts) for key, parts in groups.items())

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> Sample:
        s, key, parts = self.records[i]
        shard = self.shards[s]
        where = f"{shard}: sample {key!r}"
        row: dict[str, Any] = {}
        for ext, (offset, size) in parts.items():
            if ext in IMAGE_KEYS or ext in CAPTION_KEYS or ext == "json":
                data = _read_range(shard, offset, size)
                if len(data) != size:
                    raise SampleError(f"{where}: member .{ext} is cut short ({len(data)} of {size} bytes)")
                row[ext] = data
        if not any(k in row for k in IMAGE_KEYS):
            raise SampleError(f"{where}: no image member (.{' / .'.join(IMAGE_KEYS)}): missing partner file")
        meta = {}
        if "json" in row:
            try:
                meta = json.loads(row.pop("json"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SampleError(f"{where}: .json member is not JSON ({e})") from None
            meta = {k: v for k, v in meta.items() if k in ("caption", "text")} if isinstance(meta, dict) else {}
        for k in CAPTION_KEYS:
            if k in row:
                try:
                    row[k] = row[k].decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise SampleError(f"{where}: .{k} member is not UTF-8 text") from None
        row = {**meta, **row}  # a .txt caption wins over the .json one
        return row_sample(row, sid=f"{Path(shard).name}/{key}", task=self.task, where=where, root=self.root)


class ParquetRows(StreamSource):
    """Parquet files (OBELICS-style ``texts``/``images`` or image+caption or ``text`` columns), by row group."""

    def __init__(self, path: str | Path, task: str = "interleaved", cache_groups: int = 2):
        import pyarrow.parquet as pq

        self._pq, self.files = pq, data_files(path, (".parquet",))
        self.root, self.task, self.problems = str(Path(path) if Path(path).is_dir() else Path(path).parent), task, []
        self.groups: list[tuple[str, int]] = []  # (file, row group)
        self.starts = array("q")  # first record number of each row group
        total = 0
        for f in self.files:
            try:
                meta = pq.ParquetFile(f).metadata  # the footer only
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
                self.problems.append(f"{f}: unreadable parquet ({' '.join(str(e).split())}); file left out")
                continue
            for g in range(meta.num_row_groups):
                self.groups.append((f, g))
                self.starts.append(total)
                total += meta.row_group(g).num_rows
        self.total, self.cache_groups = total, cache_groups
        self._cache: OrderedDict[tuple[str, int], list[dict]] = OrderedDict()

    def __len__(self) -> int:
        return self.total

    def row_groups(self, task: str) -> list[int]:
        """Records per row group, in record order: training draws a window of groups at a time
        (``order.PassOrder``), so with the ``cache_groups`` cache each is decoded about once per pass."""
        ends = list(self.starts[1:]) + [self.total]
        return [end - start for start, end in zip(self.starts, ends)]

    def _rows(self, f: str, g: int) -> list[dict]:
        if (f, g) not in self._cache:
            try:
                rows = self._pq.ParquetFile(f).read_row_group(g).to_pylist()
            except Exception as e:
                raise SampleError(f"{f}: row group {g} unreadable ({' '.join(str(e).split())[:200]})") from None
            self._cache[(f, g)] = rows
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        return self._cache[(f, g)]

    def record(self, i: int) -> Sample:
        j = bisect.bisect_right(self.starts, i) - 1
        f, g = self.groups[j]
        r = i - self.starts[j]
        rows = self._rows(f, g)
        return row_sample(rows[r], sid=f"{Path(f).name}/{g}/{r}", task=self.task,
                          where=f"{f}: row group {g}, row {r}", root=self.root)


class JsonLines(StreamSource):
    """JSON lines of ``{"text": ...}`` (or image+caption / interleaved records), by byte offset."""

    def __init__(self, path: str | Path, task: str = "text_only"):
        self.files = data_files(path, (".jsonl",))
        self.root, self.task, self.problems = str(Path(path) if Path(path).is_dir() else Path(path).parent), task, []
        self.where: list[tuple[int, int]] = []  # (file, line number) of each record
        self.offsets = array("q")
        for n, f in enumerate(self.files):
            with open(f, "rb") as fh:
                offset = 0
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        self.offsets.append(offset)
                        self.where.append((n, number))
                    offset += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> Sample:
        n, number = self.where[i]
        f = self.files[n]
        where = f"{f}: line {number}"
        with open(f, "rb") as fh:
            fh.seek(self.offsets[i])
            line = fh.readline()
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError(f"{where}: not JSON ({e})") from None
        return row_sample(row, sid=f"{Path(f).name}/{number}", task=self.task, where=where, root=self.root)


class ArrowFolder(StreamSource):
    """A Hugging Face ``Dataset.save_to_disk`` folder, read with pyarrow (memory-mapped; ``datasets`` not needed).

    A ``DatasetDict`` folder uses its ``train`` split (or its only one).
    """

    def __init__(self, path: str | Path, task: str = "custom"):
        import pyarrow as pa

        folder = Path(path)
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            folder = folder / ("train" if "train" in splits else splits[0])
        state = folder / "state.json"
        if not state.is_file():
            raise ConfigError(f"{path}: not a save_to_disk folder (no state.json)")
        self.root, self.task, self.problems = str(folder), task, []
        self.batches: list[tuple[str, Any]] = []  # memory-mapped record batches
        self.starts, total = array("q"), 0
        for entry in json.loads(state.read_text()).get("_data_files", []):
            f = str(folder / entry["filename"])
            try:
                for batch in pa.ipc.open_stream(pa.memory_map(f)):
                    self.batches.append((f, batch))
                    self.starts.append(total)
                    total += batch.num_rows
            except Exception as e:
                self.problems.append(f"{f}: unreadable Arrow file ({' '.join(str(e).split())}); the rest of it is left out")
        self.total = total

    def __len__(self) -> int:
        return self.total

    def record(self, i: int) -> Sample:
        j = bisect.bisect_right(self.starts, i) - 1
        f, batch = self.batches[j]
        r = i - self.starts[j]
        return row_sample(batch.slice(r, 1).to_pylist()[0], sid=f"{Path(f).name}/{i}", task=self.task,
                          where=f"{f}: row {i}", root=self.root)
