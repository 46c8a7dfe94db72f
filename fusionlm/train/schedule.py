"""The learning-rate schedule of a stage, as a function of its step."""

from __future__ import annotations

import math

from ..config import StageConfig


def lr_lambda(stage: StageConfig):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak.

    Not transformers' ``get_cosine_with_min_lr_schedule_with_warmup``: its warmup starts at 0
    (step/w, so the first step learns nothing) where this one starts at 1/w ((step+1)/w), and
    past the last step it keeps following the cosine up again where this one stays at the floor.
    """

    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        span = max(1, stage.steps - stage.warmup_steps)
        t = min(1.0, (step - stage.warmup_steps) / span)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor
