"""Training batches: a mixture of task families drawn deterministically, encoded and padded.

Batch ``k`` of a stage is a pure function of (seed, stage, k): it holds sample numbers
``k*B … k*B+B-1``, each assigned a task by the mixture weights. That makes the data position of a
run one integer, lets worker processes build batches ahead in any order, and makes a resumed run
see exactly the batches the uninterrupted one would. Samples that cannot be used (a broken image,
too long, nothing to learn) are left out of their batch and reported with their reason.

Which record a sample reads: a task of limited size is drawn as a stream of passes
(``order.PassOrder``: each pass a permutation, read row-group window by row-group window), and
sample ``n`` reads the stream at the number of draws of its task before it. Those counts are a
pure function of the task choices, which are drawn per block of sample numbers, so they are
computed (and cached) rather than remembered. One optimizer step (``grad_accum`` micro-batches of
all ranks) never straddles two passes of a task: when a step's draws of a task would run past the
end of a pass, the step starts the next pass, and the few records left at the end of that pass
(fewer than the step's draws) wait for a later pass. So a step never holds a record twice, unless
the task has fewer records than the step draws from it; then every record appears
``draws // size`` or ``draws // size + 1`` times. Unlimited tasks (the synthetic world) draw a
fresh index per sample number.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np
import torch

from ...errors import ConfigError, FusionError, ImageError
from ..chat import IGNORE, Encoded, SkipSample
from ..drawing import draws_pictures, null_prompt
from .order import PassOrder, generator, stable_seed
from .packing import Packing, packed
from ..pixels.processing import ImageBatch, ImageSpec
from ..prompt import PromptEncoder, Prompted
from ..sample import Sample

__all__ = ["Batch", "ImageSpec", "MixtureBatches", "Skip", "collate", "check_mixture", "stable_seed"]


class SampleSource(Protocol):
    root: str | None  # the folder image paths are resolved against (None: images are in memory)

    def tasks(self) -> list[str]: ...

    def corpus(self, per_task: int, tasks: list[str] | None = None) -> Iterator[str]: ...

    def get(self, task: str, split: str, index: int) -> Sample: ...

    def size(self, task: str) -> int | None: ...  # samples of a task (None: unlimited)

    # Optional: ``row_groups(task) -> list[int] | None``, the sizes of the runs of consecutive
    # indices the source decodes together (parquet row groups), so draws follow them (``order``).


TASK_BLOCK = 4096  # sample numbers whose tasks are drawn with one generator
MARK_EVERY = 1024  # steps between the saved stream positions of the draw count
SCAN_NUMBERS = 1 << 20  # sample numbers counted at once when catching up on the stream positions


@dataclass
class Skip:
    sample_id: str
    reason: str
    detail: str


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE where no loss
    attention_mask: torch.Tensor  # (B, T)
    pixels: ImageBatch | None  # the batch's images in order, as the encoder reads them (None: no image)
    sample_ids: list[str]
    tasks: list[str]
    skipped: list[Skip] = field(default_factory=list)
    segments: torch.Tensor | None = None  # (B, T) packed rows: each token's sample (1, 2, …; 0 = padding)
    drawn: torch.Tensor | None = None  # (G, 3, S, S) in [-1, 1]: the pictures the batch draws, in order
    noise: torch.Tensor | None = None  # (G, 3, S, S) the diffusion design: each drawn picture's noise
    times: torch.Tensor | None = None  # (G,) and its noise level

    def to(self, device: torch.device) -> "Batch":
        if self.input_ids.device == device:
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                     None if self.pixels is None else self.pixels.to(device), self.sample_ids, self.tasks,
                     self.skipped, move(self.segments), move(self.drawn), move(self.noise), move(self.times))

    @property
    def num_images(self) -> int:
        return 0 if self.pixels is None else len(self.pixels)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def pad_right(encoded: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, labels, mask


ALL_TASKS = "*"  # in a mixture: every task of the data not named on its own, each with this weight


def check_mixture(mixture: dict[str, float], source: SampleSource, *, key: str) -> dict[str, float]:
    """Every task a mixture names must exist in the data; returns the mixture with ``*`` expanded."""
    known = source.tasks()
    unknown = [t for t in mixture if t not in known and t != ALL_TASKS]
    if unknown:
        raise ConfigError(f"{key}: unknown task {unknown[0]!r} (this data has: {', '.join(known)})")
    expanded = {t: w for t, w in mixture.items() if t != ALL_TASKS}
    if ALL_TASKS in mixture:
        expanded.update({t: mixture[ALL_TASKS] for t in known if t not in mixture})
    return expanded


class MixtureBatches(torch.utils.data.Dataset):
    """Map-style dataset: index k -> training micro-batch k of one stage.

    Optimizer step ``s`` is micro-batches ``s*grad_accum …``: sample numbers ``s*S … s*S+S-1`` with
    ``S = batch_size * grad_accum``; each rank takes its contiguous share of every micro-batch (with
    ``group_by_length``, its shares of the step's micro-batches, regrouped by length).
    """

    def __init__(self, source: SampleSource, mixture: dict[str, float], *, seed: int, stage: int,
                 batch_size: int, prompts: PromptEncoder, split: str = "train", rank: int = 0, world: int = 1,
                 pack: Packing | None = None, grad_accum: int = 1, condition_dropout: float = 0.0,
                 group_by_length: bool = False):
        mixture = check_mixture(mixture, source, key=f"stages.{stage}.mixture")
        self.source, self.split = source, split
        self.task_names = [t for t, w in mixture.items() if w > 0]
        self.weights = [mixture[t] for t in self.task_names]
        self.seed, self.stage, self.batch_size = seed, stage, batch_size
        self.prompts = prompts  # how a sample becomes ids, labels and encoder inputs
        self.rank, self.world = rank, world  # data parallelism: this process's share of each batch
        self.pack = pack  # several samples per row (``packing``); None: one sample per row
        # unpacked, grad_accum > 1: this process's samples of a step, sorted by length, fill its
        # micro-batches in turn (less padding; the step's samples, hence its summed loss, unchanged)
        self.group_by_length = group_by_length and pack is None and grad_accum > 1
        self.grad_accum = grad_accum
        self._grouped: tuple[int, list[Prompted], list[str], list[Skip], list[np.ndarray]] | None = None
        self.condition_dropout = condition_dropout  # share of drawing samples trained on the null prompt
        if grad_accum < 1:
            raise ConfigError(f"stages.{stage}.grad_accum: must be >= 1, got {grad_accum}")
        self.step_size = batch_size * grad_accum  # sample numbers of one optimizer step: all ranks, micro-batches
        self._cum = np.cumsum(self.weights) / sum(self.weights)  # (T,) for drawing task ids
        groups = getattr(source, "row_groups", None)
        self.orders: list[PassOrder | None] = []  # per task; None: unlimited (or empty), any index is new
        for t in self.task_names:
            n = source.size(t)
            self.orders.append(PassOrder(n, groups(t) if groups else None, (seed, stage, t)) if n else None)
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._marks = {0: np.zeros(len(self.task_names), dtype=np.int64)}  # step -> stream positions before it
        self._last = (0, self._marks[0])  # the latest step whose stream positions are known
        self._steps: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return 2**31 - 1  # batches are generated on demand

    def sample_at(self, number: int) -> Sample:
        step, i = divmod(number, self.step_size)
        tasks, draws = self._draws(step)
        t = int(tasks[i])
        order = self.orders[t]
        if order is None:
            index = stable_seed(self.seed, self.stage, number, "index") % 2**31
        else:
            index = order.record(int(draws[i]))
        sample = self.source.get(self.task_names[t], self.split, index)
        if self.condition_dropout and draws_pictures(sample):
            if generator(self.seed, self.stage, number, "null prompt").random() < self.condition_dropout:
                return null_prompt(sample, self.prompts.draw.null)
        return sample

    # ---------------------------------------------------------------- which record each sample reads

    def _block(self, j: int, keep: bool = True) -> np.ndarray:
        """(TASK_BLOCK,) the task ids of sample numbers ``j*TASK_BLOCK …``, drawn by the weights."""
        if j in self._blocks:
            return self._blocks[j]
        u = generator(self.seed, self.stage, "tasks", j).random(TASK_BLOCK)
        ids = np.minimum(np.searchsorted(self._cum, u, side="right"), len(self._cum) - 1)
        if keep:
            self._blocks[j] = ids
            while len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return ids

    def _tasks(self, a: int, b: int, keep: bool = True) -> np.ndarray:
        """(b-a,) the task ids of sample numbers ``a … b-1``."""
        first, last = a // TASK_BLOCK, (b - 1) // TASK_BLOCK
        ids = np.concatenate([self._block(j, keep) for j in range(first, last + 1)])
        return ids[a - first * TASK_BLOCK: b - first * TASK_BLOCK]

    def _start(self, t: int, q: int, count: int) -> int:
        """Where task ``t``'s ``count`` draws of one step start, its stream being at draw ``q``:
        at ``q``, or at the next pass when they would run past the end of this one."""
        size = self.orders[t].size
        into = q % size
        return q + size - into if into and into + count > size else q

    def _positions(self, step: int) -> np.ndarray:
        """(T,) each task's stream position before ``step``: a pure function of the earlier steps' draws."""
        finite = [t for t, o in enumerate(self.orders) if o is not None]
        if not finite:
            return self._marks[0]
        at, q = self._last if self._last[0] <= step else max(
            ((s, v) for s, v in self._marks.items() if s <= step), key=lambda sv: sv[0])
        q = q.copy()
        while at < step:
            n = min(step - at, max(1, SCAN_NUMBERS // self.step_size))
            ids = self._tasks(at * self.step_size, (at + n) * self.step_size, keep=False).reshape(n, -1)
            counts = np.stack([(ids == t).sum(axis=1) for t in finite], axis=1)  # (n, finite tasks)
            for row in counts.tolist():
                for t, c in zip(finite, row):
                    if c:
                        q[t] = self._start(t, int(q[t]), c) + c
                at += 1
                if at % MARK_EVERY == 0:
                    self._marks[at] = q.copy()
        self._last = (at, q)
        return q

    def _draws(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(S,) task ids of the step's samples and (S,) each one's draw number in its task's stream."""
        if step not in self._steps:
            tasks = self._tasks(step * self.step_size, (step + 1) * self.step_size)
            q, draws = self._positions(step), np.zeros(self.step_size, dtype=np.int64)
            for t, order in enumerate(self.orders):
                mine = tasks == t
                count = int(mine.sum())
                if order is not None and count:
                    draws[mine] = self._start(t, int(q[t]), count) + np.arange(count)
            self._steps[step] = (tasks, draws)
            while len(self._steps) > 2:
                self._steps.popitem(last=False)
        return self._steps[step]

    def __getitem__(self, k: int) -> Batch:
        if not self.group_by_length:
            return collate(*self._prepared(self._numbers(k)), self.prompts.tokenizer.pad_token_id, pack=self.pack)
        step, m = divmod(k, self.grad_accum)
        if self._grouped is None or self._grouped[0] != step:
            first = step * self.grad_accum
            prompted, tasks, skipped = self._prepared(
                [n for j in range(first, first + self.grad_accum) for n in self._numbers(j)])
            by_length = sorted(range(len(prompted)), key=lambda i: len(prompted[i].encoded.input_ids))
            self._grouped = (step, prompted, tasks, skipped, np.array_split(np.array(by_length, dtype=np.int64),
                                                                           self.grad_accum))
        _, prompted, tasks, skipped, chunks = self._grouped
        mine = chunks[m].tolist()
        return collate([prompted[i] for i in mine], [tasks[i] for i in mine], skipped if m == 0 else [],
                       self.prompts.tokenizer.pad_token_id)

    def _numbers(self, k: int) -> range:
        """The sample numbers of micro-batch ``k`` that this process takes."""
        share = self.batch_size // self.world
        first = k * self.batch_size + self.rank * share
        return range(first, first + share)

    def _prepared(self, numbers) -> tuple[list[Prompted], list[str], list[Skip]]:
        """The samples ``numbers`` encoded, their tasks, and those skipped (with why)."""
        prompted, tasks, skipped = [], [], []
        draw = self.prompts.draw
        masks = draw is not None and (draw.mask >= 0 or draw.noised)  # the masked and diffusion designs' samples
        purpose = "picture noise" if draw is not None and draw.noised else "masked codes"
        for number in numbers:
            sample = None
            try:
                sample = self.sample_at(number)
                rng = generator(self.seed, self.stage, number, purpose) if masks else None
                prompted.append(self.prompts.sample(sample, rng=rng))
            except SkipSample as exc:
                skipped.append(Skip(sample.id, exc.reason, str(exc)))
                continue
            except ImageError as exc:
                skipped.append(Skip(sample.id if sample else f"#{number}", "bad_image", str(exc)))
                continue
            except FusionError as exc:  # a malformed sample from a file source
                skipped.append(Skip(sample.id if sample else f"#{number}", "bad_sample", str(exc)))
                continue
            tasks.append(sample.task)
        return prompted, tasks, skipped


def collate(prompted: list[Prompted], tasks: list[str], skipped: list[Skip], pad_id: int, *,
            pack: Packing | None = None) -> Batch:
    """A padded batch, one sample per row; or, with ``pack``, the samples packed into rows
    (``packing``), their images and pictures in the rows' order."""
    if not prompted:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return Batch(empty, empty, empty, None, [], [], skipped)
    encoded = [p.encoded for p in prompted]
    segments = None
    if pack is not None:
        ids, labels, mask, segments, order = packed(encoded, pack, pad_id)
        prompted, tasks = [prompted[i] for i in order], [tasks[i] for i in order]
    else:
        ids, labels, mask = pad_right(encoded, pad_id)
    drawn = [d for p in prompted for d in p.drawn]
    noise = [x for p in prompted for x in p.noise]
    times = [t for p in prompted for t in p.times]
    return Batch(ids, labels, mask, ImageBatch.collate([x for p in prompted for x in p.inputs]),
                 [p.encoded.sample_id for p in prompted], tasks, skipped, segments,
                 torch.stack(drawn) if drawn else None, torch.stack(noise) if noise else None,
                 torch.tensor(times) if times else None)
