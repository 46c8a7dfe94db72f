"""Data parallelism across processes, as launched by ``torchrun --nproc-per-node N $(which fusionlm) train …``,
built on PyTorch's own engines.

Each process finds its place from torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (``plan``): on a
GPU machine process r of a node runs on ``cuda:LOCAL_RANK``, and one process group serves both CPU
tensors (gloo: counters, logged losses) and CUDA tensors (NCCL: gradients).

A stage's ``batch_size`` is the global batch: process r of W takes its r-th contiguous share of
each micro-batch's samples. The loop divides each process's summed loss by the item count of the
whole step over all processes (target tokens for ``lm``), and gradients are *summed* over processes,
so the update is that of the whole batch on one process, for any W and any ``grad_accum``.

Two ways to hold the model (``train.parallel``):

* ``ddp``: every process holds all of it; PyTorch's ``DistributedDataParallel`` sums the gradients
  in buckets while backward runs, once per optimizer step (``no_sync`` while accumulating).
* ``fsdp``: FSDP2 (``fully_shard``) shards the LLM's decoder layers one by one and everything else
  (encoder, connector, embeddings) as one more group: each process keeps 1/W of the weights,
  gradients and optimizer state, gathers a group's weights only while it runs, and reduce-scatters
  its gradients during backward. With ``train.bf16`` the gathered weights are bf16 and the
  gradients are reduced in fp32 (``MixedPrecisionPolicy``).

Checkpoints (``train.checkpoint_format``) hold either whole tensors, gathered with
``torch.distributed.checkpoint.state_dict`` and written by rank 0 (``full``), or each process's own
shards, written by every process at once with ``torch.distributed.checkpoint`` and nothing gathered
(``sharded``, for models too big to gather on one process). Both resume on any number of processes.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)

from ..checkpoint import shard_io, unique_names
from ..device import resolve_device
from ..errors import ConfigError

NCCL = "cpu:gloo,cuda:nccl"  # one group for both: CPU tensors over gloo, CUDA tensors over NCCL


@dataclass(frozen=True)
class Placement:
    """Where one process runs: its rank among ``world``, its device and the process group's backend."""

    world: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no group


def plan(env: Mapping[str, str], device: str = "auto", backend: str = "auto") -> Placement:
    """The placement of the process that torchrun's variables in ``env`` describe."""
    world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", str(rank)))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        gpus = torch.cuda.device_count()
        if chosen.index is not None and world > 1:
            raise ConfigError(f"train.device: {device!r} puts every process on one GPU; under torchrun use "
                              "cuda or auto (process r of a node runs on cuda:LOCAL_RANK)")
        index = chosen.index if chosen.index is not None else local
        if index >= gpus:
            raise ConfigError(f"LOCAL_RANK {local}: this machine has {gpus} GPU(s) (cuda:0 … cuda:{gpus - 1}); "
                              "start at most one process per GPU")
        chosen = torch.device("cuda", index)
    if world == 1:
        return Placement(1, 0, 0, chosen, None)
    if backend == "auto":
        backend = "nccl" if chosen.type == "cuda" else "gloo"
    if backend == "nccl" and chosen.type != "cuda":
        raise ConfigError(f"train.backend: nccl needs CUDA devices, and this run is on {chosen.type}; use gloo or auto")
    return Placement(world, rank, local, chosen, NCCL if backend == "nccl" else "gloo")


class Group:
    """This process's place among the training processes (one process: rank 0 of 1, no communication)."""

    def __init__(self, train) -> None:
        placement = plan(os.environ, train.device, train.backend)
        self.world, self.rank, self.device = placement.world, placement.rank, placement.device
        self.main = self.rank == 0
        self.sharded = train.parallel == "fsdp" and self.world > 1
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(placement.backend, timeout=timedelta(seconds=train.timeout_s),
                                    device_id=self.device if self.device.type == "cuda" else None)

    def sum(self, values: list[float]) -> list[float]:
        """The sums over all processes of each of ``values`` (on the CPU: gloo)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, value) -> list:
        """Every process's ``value``, in rank order."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self, *, ok: bool) -> None:
        """Leave the group at the end of a run (call it once nothing holds the run's engines): after a
        barrier when the run ``ok``-ended everywhere, so that no process is still sending, then the
        group torn down while Python is whole. Left to the interpreter's exit, gloo's threads abort
        the process now and then ("terminate called without an active exception": 13 of 40 runs of
        two processes here)."""
        if self.world == 1 or not dist.is_initialized():
            return
        if ok:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # what still held the group's threads (DDP's reducer, FSDP's mesh) goes now

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. downloads hub weights into the cache), the others after it."""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()

    # ------------------------------------------------------------------ the engines

    def shard(self, root: nn.Module, layers: list[nn.Module], *, bf16: bool) -> None:
        """fsdp: FSDP2 on each of ``layers`` (run by every forward pass on every process) and on ``root``."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(root, mp_policy=policy)
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # a sum over processes, as in ddp,
                module.set_force_sum_reduction_for_comms(True)  # reduced as SUM (gloo has no PREMUL_SUM)
                if hasattr(module, "set_reduce_scatter_unused_params"):  # not in older torch: ``step.touch`` covers it
                    module.set_reduce_scatter_unused_params(True)  # a part this process skipped: zeros

    def engine(self, step: nn.Module) -> nn.Module:
        """What runs a stage's micro-batches: ``step`` itself (one process, or already sharded), else
        ``step`` under DDP, built after the stage has chosen what trains."""
        if self.world == 1 or self.sharded:
            return step
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(step, broadcast_buffers=False, gradient_as_bucket_view=True)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp

    def accumulating(self, engine: nn.Module, *, sync: bool):
        """The context for one micro-batch's forward and backward: gradients are reduced only when
        ``sync`` (the step's last micro-batch), else they accumulate in each process."""
        if sync or self.world == 1:
            return nullcontext()
        if self.sharded:
            return _fsdp_no_sync(engine)
        return engine.no_sync()

    # ------------------------------------------------------------------ whole state, any process count

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's state with sharded tensors gathered whole, on rank 0 (every process must call
        it); None with one process (the module's own state dict is whole)."""
        if not self.sharded:
            return None
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        keep = unique_names(model)  # tied weights (e.g. the LM head and the embeddings) are written once
        return {k: v for k, v in full.items() if k in keep}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, full: bool = True) -> dict:
        """The optimizer's state keyed by parameter name (every process must call it): whole, or
        (``full=False``) each process's own shards of it, as ``save_shards`` writes them."""
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full,
                                                                                   cpu_offload=self.sharded and full))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a whole optimizer state (as ``optimizer_state`` wrote it), each process keeping its shards."""
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    # ------------------------------------------------------------------ each process's shards

    def save_shards(self, model: nn.Module, optimizer_state: dict, folder: Path) -> None:
        """Every process writes its own shards of the model and of ``optimizer_state`` (from
        ``optimizer_state(full=False)``) into ``folder`` at once; nothing is gathered (every process
        must call it, ``folder`` on a file system they all see)."""
        keep = unique_names(model)
        weights = {k: v for k, v in get_model_state_dict(model).items() if k in keep}
        with shard_io(folder, "write the shards"):
            dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=str(folder),
                     no_dist=self.world == 1)

    def load_optimizer_shards(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """The optimizer state that ``save_shards`` wrote into ``folder``, re-split for these processes."""
        state = get_optimizer_state_dict(model, optimizer)  # this process's shards, initialised: the layout to fill
        with shard_io(folder, "load its optimizer state into this stage's optimizer"):
            dcp.load({"optimizer": state}, checkpoint_id=str(folder), no_dist=self.world == 1)
        set_optimizer_state_dict(model, optimizer, state)


@contextmanager
def _fsdp_no_sync(root):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def _sum_hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP's all-reduce of a ``dist.GradBucket`` without its division by the world size: the loss is
    already scaled. A future of the summed bucket."""
    return dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future().then(lambda f: f.value()[0])


def all_rows(local: torch.Tensor, group: Group | None) -> tuple[torch.Tensor, int]:
    """Every process's rows of ``local`` in rank order, and the offset of this process's own.

    Only this process's own rows carry gradient: each process's loss over all rows then gives it
    exactly the gradient of its own rows, and summing the gradients over processes (DDP, FSDP)
    gives that of the one-process loss. No collective runs in backward, so its order cannot
    interleave with the engine's gradient reductions differently on different processes."""
    if group is None or group.world == 1:
        return local, 0
    counts = torch.tensor([local.shape[0]], device=local.device)
    everyone = [torch.empty_like(counts) for _ in range(group.world)]
    dist.all_gather(everyone, counts)
    sizes = [int(c) for c in everyone]
    padded = local.detach().new_zeros((max(sizes), *local.shape[1:]))  # (max n, D): all_gather wants equal shapes
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    rows = [part[:n] for part, n in zip(parts, sizes)]
    rows[group.rank] = local  # (n, D), with its gradient
    return torch.cat(rows), sum(sizes[: group.rank])  # (N, D)
