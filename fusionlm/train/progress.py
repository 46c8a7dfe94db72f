"""Where a run stands (``Progress``, saved in every checkpoint) and what one step's samples were
(``Counts``, summed over processes by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.batching.batches import Batch


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    stage: int = 0
    stage_step: int = 0
    step: int = 0  # optimizer steps over all stages
    samples_seen: int = 0
    samples_trained: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bad_steps: int = 0  # non-finite steps skipped in a row
    tokens: int = 0


class Counts:
    """A step's samples, counted in this process (``Trainer._count`` sums them over processes)."""

    REASONS = ("too_long", "no_target", "bad_image", "bad_sample")

    def __init__(self) -> None:
        self.seen = self.trained = 0
        self.skipped = {r: 0 for r in self.REASONS}

    def add(self, batch: Batch, log) -> None:
        self.seen += len(batch.sample_ids) + len(batch.skipped)
        self.trained += len(batch.sample_ids)
        for skip in batch.skipped:
            self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
            log(f"skipped {skip.detail}")
