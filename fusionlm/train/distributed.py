"""Data parallelism across processes, as launched by ``torchrun --nproc-per-node N $(which fusionlm) train …``.

A stage's ``batch_size`` is the global batch: process r of W takes its r-th contiguous share of
batch k's samples. Each process scales its loss so that the gradients, summed over processes, are
exactly those of the whole batch on one process (token-level mean for the language-model loss),
which keeps batch size, gradient accumulation and the learning-rate schedule meaning the same
thing for any W. Counters and logged losses are summed over processes; only rank 0 writes logs
and checkpoints, and a checkpoint loads on any number of processes (it holds the full state).

Two ways to hold the model (``train.parallel``):

* ``ddp``: every process holds all of it; the gradients are summed by one all-reduce (what
  PyTorch's DDP does, without its bucketing).
* ``fsdp``: the LLM's decoder layers are sharded across processes with FSDP2 (``fully_shard``):
  each keeps 1/W of their weights, gradients and optimizer state, and gathers a layer's weights
  only while it runs. The rest (encoder, connector, cross-attention blocks, embeddings) is small
  next to the LLM, may be skipped by a process whose batch has no image, and is kept as in ``ddp``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor



class Group:
    """This process's place among the training processes (one process: rank 0 of 1, no communication)."""

    def __init__(self, parallel: str = "ddp") -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0
        self.sharded = parallel == "fsdp" and self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """The sums over all processes of each of ``values``."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------ sharding (fsdp)

    def shard(self, layers: list[torch.nn.Module]) -> None:
        """FSDP2 on each of ``layers`` (modules every forward pass runs, on every process)."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)

    def full_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with sharded tensors gathered whole (every process must call it)."""
        return {k: gathered(v) for k, v in module.state_dict().items()}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict with sharded tensors gathered whole: the layout one process
        writes, so a checkpoint resumes on any number of processes (every process must call it)."""
        state = optimizer.state_dict()
        state["state"] = {i: {k: gathered(v) for k, v in s.items()} for i, s in state["state"].items()}
        return state

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a whole (one-process layout) optimizer state, each process keeping its shards."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, entry in state["state"].items():
            p = params[int(i)]
            if isinstance(p, DTensor):
                entry.update({k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                              for k, v in entry.items() if isinstance(v, torch.Tensor) and v.shape == p.shape})
        optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ gradients

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient with its sum over all processes (a missing one counts as zeros).
        Sharded ones were already reduce-scattered by FSDP, as a mean: they are scaled back to a sum."""
        if self.world == 1:
            return
        plain = [p for p in params if not isinstance(p, DTensor)]
        for p in params:
            if isinstance(p, DTensor) and p.grad is not None:
                p.grad.mul_(self.world)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plain]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        for p, part in zip(plain, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p).to(p.dtype)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Scale the gradients so that their global L2 norm is at most ``max_norm``; the norm before."""
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        grads = [p.grad for p in params if p.grad is not None]
        zero = torch.zeros((), device=params[0].device)
        sharded = sum((g.to_local().float().pow(2).sum() for g in grads if isinstance(g, DTensor)), zero)
        dist.all_reduce(sharded)  # the shards' squares, over all processes
        plain = sum((g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)), zero)
        norm = float((sharded + plain).sqrt())
        scale = max_norm / (norm + 1e-6)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return norm

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def gathered(value):
    """A sharded tensor gathered whole (a collective); anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value
