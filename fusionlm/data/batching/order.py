"""The order a task's records are drawn in: each pass a fresh permutation, read a window at a time.

A task of ``size`` records is drawn as an endless stream: draw ``q`` (0, 1, 2, ...) reads record
``PassOrder(...).record(q)``, which is position ``q % size`` of pass ``q // size``. Each pass is a
permutation of all the records, so within a pass no record is drawn twice.

When a source decodes records a row group at a time (parquet), a pass is built the way webdataset
and ``datasets`` streaming shuffle (shards in a random order, then a shuffle buffer): the row
groups are put in a random order, that order is cut into windows of ``window`` groups, and the
records of each window are shuffled among themselves. A pass then reads one window after the
other, so a reader that keeps the last ``window`` decoded groups (``ParquetRows``) decodes each
group about once per pass instead of once per record. A source without row groups (JSON lines,
tar shards, in-memory files) gets one plain permutation per pass; above ``PLAIN_LIMIT`` records it
is shuffled the same way in blocks of ``BLOCK`` records, to keep memory at one window.

Everything is a pure function of (seed, pass): any process builds the same order, in any order of
calls. Memory is a few integers per row group plus the last few windows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

WINDOW = 2  # row groups shuffled together: ParquetRows keeps the last 2 decoded
PLAIN_LIMIT = 1 << 22  # records a plain permutation may hold (32 MiB); beyond, blocks as if row groups
BLOCK = 1 << 16  # ... of this many records
_KEEP = 3  # windows kept shuffled (a step may straddle two)


def stable_seed(*parts: Any) -> int:
    """A seed from any parts, stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def generator(*parts: Any) -> np.random.Generator:
    """A numpy generator seeded by ``stable_seed(*parts)``."""
    return np.random.Generator(np.random.PCG64(stable_seed(*parts)))


class PassOrder:
    """Draw number -> record number of one task: pass ``q // size`` permuted by row-group windows.

    ``groups``: the sizes of the runs of consecutive record numbers a source decodes together
    (they sum to ``size``); None: records are read one by one at the same cost in any order.
    """

    def __init__(self, size: int, groups: Sequence[int] | None, seed: Any, *, window: int = WINDOW):
        if size < 1 or window < 1:
            raise ValueError(f"PassOrder: need size >= 1 and window >= 1, got {size} and {window}")
        if groups is None and size > PLAIN_LIMIT:
            groups = [BLOCK] * (size // BLOCK) + ([size % BLOCK] if size % BLOCK else [])
        if groups is not None and (sum(groups) != size or any(n < 0 for n in groups)):
            raise ValueError(f"PassOrder: row groups of {sum(groups)} records for a task of {size}")
        self.size, self.seed, self.window = size, seed, window
        self.sizes = np.asarray(groups if groups is not None else [size], dtype=np.int64)  # (G,) records per group
        self.starts = np.cumsum(self.sizes) - self.sizes  # (G,) first record number of each group
        self._passes: OrderedDict[int, tuple[list[np.ndarray], np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def record(self, q: int) -> int:
        """The record number of draw ``q``."""
        p, i = divmod(q, self.size)
        windows, firsts = self._layout(p)
        w = int(np.searchsorted(firsts, i, side="right")) - 1
        return int(self._window(p, w, windows[w])[i - firsts[w]])

    def _layout(self, p: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Pass ``p``: the groups of each window (in read order) and each window's first position."""
        if p not in self._passes:
            order = generator(self.seed, "groups", p).permutation(len(self.sizes))
            order = order[self.sizes[order] > 0]  # (G',) non-empty groups in read order
            windows = [order[j:j + self.window] for j in range(0, len(order), self.window)]
            lengths = np.asarray([self.sizes[g].sum() for g in windows], dtype=np.int64)
            self._passes[p] = (windows, np.cumsum(lengths) - lengths)
            while len(self._passes) > 2:
                self._passes.popitem(last=False)
        return self._passes[p]

    def _window(self, p: int, w: int, groups: np.ndarray) -> np.ndarray:
        """(n,) the record numbers of window ``w`` of pass ``p``, shuffled: the shuffle buffer."""
        if (p, w) not in self._windows:
            records = np.concatenate([np.arange(self.starts[g], self.starts[g] + self.sizes[g]) for g in groups])
            self._windows[(p, w)] = records[generator(self.seed, "window", p, w).permutation(len(records))]
            while len(self._windows) > _KEEP:
                self._windows.popitem(last=False)
        return self._windows[(p, w)]
