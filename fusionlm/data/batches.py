"""Training batches: a mixture of task families drawn deterministically, encoded and padded.

Batch ``k`` of a stage is a pure function of (seed, stage, k): it holds sample numbers
``k*B … k*B+B-1``, each assigned a task by the mixture weights. That makes the data position of a
run one integer, lets worker processes build batches ahead in any order, and makes a resumed run
see exactly the batches the uninterrupted one would. Samples that cannot be used (a broken image,
too long, nothing to learn) are left out of their batch and reported with their reason.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from ..errors import ConfigError, FusionError, ImageError
from .chat import IGNORE, Encoded, SkipSample, encode
from .layout import ImageLayout
from .packing import packed
from .processing import ImageBatch, ImageInput, ImageSpec
from .sample import Sample

__all__ = ["Batch", "ImageSpec", "MixtureBatches", "Skip", "collate", "check_mixture", "stable_seed"]


class SampleSource(Protocol):
    root: str | None  # the folder image paths are resolved against (None: images are in memory)

    def tasks(self) -> list[str]: ...

    def corpus(self, per_task: int, tasks: list[str] | None = None) -> Iterator[str]: ...

    def get(self, task: str, split: str, index: int) -> Sample: ...

    def size(self, task: str) -> int | None: ...  # samples of a task (None: unlimited)


def stable_seed(*parts: Any) -> int:
    """A seed from any parts, stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


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
    images: ImageBatch | None  # the batch's images in order (None: no image)
    sample_ids: list[str]
    tasks: list[str]
    skipped: list[Skip] = field(default_factory=list)
    segments: torch.Tensor | None = None  # (B, T) packed rows: each token's sample (1, 2, …; 0 = padding)

    @property
    def pixel_values(self) -> ImageBatch | None:
        return self.images

    def to(self, device: torch.device) -> "Batch":
        if self.input_ids.device == device:
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                     None if self.images is None else self.images.to(device), self.sample_ids, self.tasks,
                     self.skipped, None if self.segments is None else move(self.segments))

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else len(self.images)

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
    """Map-style dataset: index k -> training batch k of one stage."""

    def __init__(self, source: SampleSource, mixture: dict[str, float], *, seed: int, stage: int,
                 batch_size: int, tokenizer, layout: ImageLayout, max_length: int, images: ImageSpec,
                 image_token: str, end_token: str, split: str = "train", rank: int = 0, world: int = 1,
                 pack: bool = False):
        mixture = check_mixture(mixture, source, key=f"stages.{stage}.mixture")
        self.source, self.split = source, split
        self.task_names = [t for t, w in mixture.items() if w > 0]
        self.weights = [mixture[t] for t in self.task_names]
        self.seed, self.stage, self.batch_size = seed, stage, batch_size
        self.tokenizer, self.layout, self.max_length, self.images = tokenizer, layout, max_length, images
        self.image_token, self.end_token = image_token, end_token
        self.rank, self.world = rank, world  # data parallelism: this process's share of each batch
        self.pack = pack  # several samples per row, up to max_length tokens (``data.packing``)

    def __len__(self) -> int:
        return 2**31 - 1  # batches are generated on demand

    def sample_at(self, number: int) -> Sample:
        rng = random.Random(stable_seed(self.seed, self.stage, number))
        task = rng.choices(self.task_names, weights=self.weights)[0]
        return self.source.get(task, self.split, stable_seed(self.seed, self.stage, number, "index") % 2**31)

    def __getitem__(self, k: int) -> Batch:
        encoded, pixels, tasks, skipped = [], [], [], []
        share = self.batch_size // self.world
        first = k * self.batch_size + self.rank * share
        for number in range(first, first + share):
            sample = None
            try:
                sample = self.sample_at(number)
                per_image = [self.images.process_all(img) for img in sample.images]
                enc = encode(sample, self.tokenizer, [self.layout.image_tokens(p) for p in per_image],
                             max_length=self.max_length, image_token=self.image_token, end_token=self.end_token)
                pix = [inp for inputs in per_image for inp in inputs]
            except SkipSample as exc:
                skipped.append(Skip(sample.id, exc.reason, str(exc)))
                continue
            except ImageError as exc:
                skipped.append(Skip(sample.id if sample else f"#{number}", "bad_image", str(exc)))
                continue
            except FusionError as exc:  # a malformed sample from a file source
                skipped.append(Skip(sample.id if sample else f"#{number}", "bad_sample", str(exc)))
                continue
            encoded.append(enc)
            pixels.extend(pix)
            tasks.append(sample.task)
        return collate(encoded, pixels, tasks, skipped, self.tokenizer.pad_token_id,
                       pack_length=self.max_length if self.pack else None)


def collate(encoded: list[Encoded], images: list[ImageInput], tasks: list[str], skipped: list[Skip],
            pad_id: int, *, pack_length: int | None = None) -> Batch:
    """A padded batch, one sample per row; or, with ``pack_length``, samples packed into rows."""
    if not encoded:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return Batch(empty, empty, empty, None, [], [], skipped)
    segments = None
    if pack_length:
        ids, labels, mask, segments = packed(encoded, pack_length, pad_id)
    else:
        ids, labels, mask = pad_right(encoded, pad_id)
    return Batch(ids, labels, mask, ImageBatch.collate(images), [e.sample_id for e in encoded], tasks, skipped,
                 segments)
