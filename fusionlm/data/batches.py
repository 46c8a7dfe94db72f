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
from .images import image_to_pixels
from .sample import Sample


class SampleSource(Protocol):
    root: str | None  # the folder image paths are resolved against (None: images are in memory)

    def tasks(self) -> list[str]: ...

    def corpus(self, per_task: int) -> Iterator[str]: ...

    def get(self, task: str, split: str, index: int) -> Sample: ...


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
    pixel_values: torch.Tensor  # (I, 3, H, W), the batch's images in order
    sample_ids: list[str]
    tasks: list[str]
    skipped: list[Skip] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class ImageSpec:
    """How images become pixels for a model: the one loader, at the encoder's size and stats."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    root: str | None = None
    max_pixels: int = 40_000_000

    @classmethod
    def for_model(cls, model, config, *, root: str | None = None) -> "ImageSpec":
        """The spec of a built model (its encoder's size and statistics) under a recipe's limits."""
        return cls(size=config.model.encoder.image_size, mean=model.encoder.mean, std=model.encoder.std,
                   root=root, max_pixels=config.data.max_image_pixels)

    def pixels(self, source: Any) -> torch.Tensor:
        return image_to_pixels(source, self.size, mean=self.mean, std=self.std, root=self.root,
                               max_pixels=self.max_pixels)  # (3, S, S)


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


def check_mixture(mixture: dict[str, float], source: SampleSource, *, key: str) -> None:
    """Every task a mixture names must exist in the data."""
    known = source.tasks()
    unknown = [t for t in mixture if t not in known]
    if unknown:
        raise ConfigError(f"{key}: unknown task {unknown[0]!r} (this data has: {', '.join(known)})")


class MixtureBatches(torch.utils.data.Dataset):
    """Map-style dataset: index k -> training batch k of one stage."""

    def __init__(self, source: SampleSource, mixture: dict[str, float], *, seed: int, stage: int,
                 batch_size: int, tokenizer, image_layout: list[int], max_length: int, images: ImageSpec,
                 split: str = "train"):
        check_mixture(mixture, source, key=f"stages.{stage}.mixture")
        self.source, self.split = source, split
        self.task_names = [t for t, w in mixture.items() if w > 0]
        self.weights = [mixture[t] for t in self.task_names]
        self.seed, self.stage, self.batch_size = seed, stage, batch_size
        self.tokenizer, self.layout, self.max_length, self.images = tokenizer, image_layout, max_length, images

    def __len__(self) -> int:
        return 2**31 - 1  # batches are generated on demand

    def sample_at(self, number: int) -> Sample:
        rng = random.Random(stable_seed(self.seed, self.stage, number))
        task = rng.choices(self.task_names, weights=self.weights)[0]
        return self.source.get(task, self.split, stable_seed(self.seed, self.stage, number, "index") % 2**31)

    def __getitem__(self, k: int) -> Batch:
        encoded, pixels, tasks, skipped = [], [], [], []
        for number in range(k * self.batch_size, (k + 1) * self.batch_size):
            sample = None
            try:
                sample = self.sample_at(number)
                enc = encode(sample, self.tokenizer, self.layout, max_length=self.max_length)
                pix = [self.images.pixels(img) for img in sample.images]
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
        return collate(encoded, pixels, tasks, skipped, self.tokenizer.pad_token_id, self.images.size)


def collate(encoded: list[Encoded], pixels: list[torch.Tensor], tasks: list[str], skipped: list[Skip],
            pad_id: int, image_size: int) -> Batch:
    if not encoded:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return Batch(empty, empty, empty, torch.zeros(0, 3, image_size, image_size), [], [], skipped)
    ids, labels, mask = pad_right(encoded, pad_id)
    pix = torch.stack(pixels) if pixels else torch.zeros(0, 3, image_size, image_size)
    return Batch(ids, labels, mask, pix, [e.sample_id for e in encoded], tasks, skipped)
