"""One micro-batch's loss as a module's forward: what DDP and FSDP wrap, so that the objective's whole
computation (the encoder, the gathered contrastive vectors, the LLM) runs inside their hooks."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..data.batching.batches import Batch
from .objectives import Loss, Objective


class TrainStep(nn.Module):
    def __init__(self, model: nn.Module, group) -> None:
        super().__init__()
        self.model = model
        self.group = group

    def forward(self, batch: Batch | None, objective: Objective) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(the loss this process back-propagates, its part of the logged loss, the objective's sums
        to report on); ``batch`` None: this process has no sample in the micro-batch."""
        loss: Loss = objective.idle(self.model, self.group) if batch is None else \
            objective.loss(self.model, batch, self.group)
        train = loss.train + touch(self.model, loss.train) if self.group.world > 1 else loss.train
        return train, loss.shown, loss.stats


def touch(model: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """Zero times one element of every trainable weight: every process then gives every trainable
    weight a gradient in every backward, so DDP's and FSDP's reductions are the same on all of them
    (a micro-batch without images skips the encoder). It costs a full-size zero gradient per weight
    in each backward, so one process does not pay it: ``zero_unused`` gives the weights no forward
    used the same zero gradient afterwards (the same Adam state and weight decay as under N).
    Weights FSDP left sharded (a layer that did not run here, nor anywhere) are left out."""
    picked = [p.reshape(-1)[:1] for p in trainable(model.parameters())]
    if not picked:
        return like.new_zeros(())
    return torch.cat(picked).sum() * 0.0


def zero_unused(params) -> None:
    """One process, after the step's backward: a zero gradient for each trainable weight that got
    none, as ``touch`` gives it under N processes."""
    for p in trainable(params):
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def trainable(params):
    return [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
