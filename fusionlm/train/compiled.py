"""Compiled decoder layers (``train.compile``): when a stage compiles them, and where the compiled
graphs are kept.

Each LLM decoder layer goes through ``torch.compile`` in place (``nn.Module.compile``: parameter
names, hence checkpoints, unchanged), which fuses its elementwise work (norms, rotary embedding,
SwiGLU, residuals). The layers are identical, so one graph serves them all. A new sequence length
recompiles once; from the second length on the graph is dynamic in it (torch's automatic dynamic
shapes), so a run compiles about twice whatever its lengths, packed or padded.

Compiling costs time up front: on the demo's model here (2 CPU cores, its ``instruct`` stage, 300
steps of 32 samples) 27-28 s more than eager with an empty cache and 3-4 s with a warm one, against
6-13 ms saved per micro-batch of 97 (``python benchmarks/compile_pays.py``, two runs: compiling paid
from 2,500-4,200 micro-batches with an empty cache, 520-990 with a warm one). ``train.compile:
null`` (the default) therefore compiles a stage's layers when the stage runs at least
``COMPILE_FROM`` micro-batches, where an empty cache paid back in both runs, and where inductor can
build kernels (a C++ compiler on the CPU, triton on CUDA). The decision is a
function of the recipe alone, so a resumed run and every process of a run decide alike.

The compiled graphs are kept on disk by torch's own caches (inductor's FX graph cache, AOTAutograd's
cache) under ``TORCHINDUCTOR_CACHE_DIR``; unless that is set, under ``~/.cache/fusionlm/inductor``
(``$XDG_CACHE_HOME`` honoured) rather than torch's default in the temporary directory, so that they
outlive a reboot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

COMPILE_FROM = 4500  # micro-batches of one stage from which ``train.compile: null`` compiles


def compiles(setting: bool | None, micro_batches: int, device: torch.device) -> bool:
    """Whether a stage of ``micro_batches`` compiles its decoder layers under ``train.compile: setting``."""
    if setting is not None:
        return setting
    return micro_batches >= COMPILE_FROM and can_compile(device)


def can_compile(device: torch.device) -> bool:
    """Inductor can build kernels for ``device``: the C++ compiler it will call for the CPU
    (``$CXX``, else g++: its ``cpp.cxx``), triton for CUDA."""
    if device.type == "cpu":
        from torch._inductor import config as inductor

        return any(c is not None and shutil.which(c) for c in inductor.cpp.cxx)
    if device.type == "cuda":
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return False


def compile_layers(layers: list[nn.Module], on: bool) -> None:
    """Compile each of ``layers`` in place (``on``), or return them to eager."""
    if on:
        cache_home()
    for layer in layers:
        if on and layer._compiled_call_impl is None:
            layer.compile()
        elif not on:
            layer._compiled_call_impl = None


def cache_home() -> Path:
    """Where torch keeps compiled graphs: ``TORCHINDUCTOR_CACHE_DIR``, set to fusionlm's cache unless given."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "fusionlm" / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
