"""Data parallelism across processes, as launched by ``torchrun --nproc-per-node N $(which fusionlm) train …``.

Every process holds the whole model. A stage's ``batch_size`` is the global batch: process r of W
takes its r-th contiguous share of batch k's samples. Each process scales its loss so that the
gradients, summed over processes, are exactly those of the whole batch on one process (token-level
mean for the language-model loss), which keeps batch size, gradient accumulation and the
learning-rate schedule meaning the same thing for any W. Counters and logged losses are summed
over processes; only rank 0 writes logs and checkpoints, and a checkpoint loads on any number of
processes (every process holds the same full state).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Group:
    """This process's place among the training processes (one process: rank 0 of 1, no communication)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """The sums over all processes of each of ``values``."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient with its sum over all processes (a missing one counts as zeros)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p).to(p.dtype)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
