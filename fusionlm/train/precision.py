"""Master weights: a part kept in a low-precision dtype (``model.llm.dtype``, ``model.encoder.dtype``)
trains in float32, computed in its own dtype through autocast.

AdamW updating bf16 weights in place loses every update smaller than the weight's last bit (bf16
keeps 8 bits of mantissa, so a weight of 0.02 ignores steps under ~1e-4), and fp16 underflows
without loss scaling. So a bf16 part that any stage trains in full is upcast to float32 before its
weights are loaded, its forward runs under bf16 autocast, and checkpoints hold the float32 masters
(``fusionlm.checkpoint`` casts them back to the part's dtype when a model is loaded to run).
A frozen part, and a part trained only through LoRA adapters (peft keeps them in float32), stay as
they are. Training an fp16 part is refused: this loop has no loss scaling.
"""

from __future__ import annotations

import torch

from ..config import RecipeConfig
from ..errors import ConfigError
from .stages import select_trainable

LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PARTS = ("llm", "encoder")


def trained_parts(model, config: RecipeConfig) -> set[str]:
    """The parts (llm, encoder) some stage of ``config`` trains in full, not only through adapters."""
    parts: set[str] = set()
    for i, stage in enumerate(config.stages):
        for name in select_trainable(model, stage.train, key=f"stages.{i}.train") if stage.train else ():
            parts.add(model.part_of(name))
    return parts & set(PARTS)


def master_weights(model, config: RecipeConfig, log=print) -> torch.dtype | None:
    """Upcast the low-precision parts that train to float32; the dtype their forward then runs in
    through autocast (None: nothing was upcast)."""
    compute = None
    for part in sorted(trained_parts(model, config)):
        dtype = getattr(config.model, part).dtype
        if dtype not in LOW:
            continue
        if dtype == "float16":
            raise ConfigError(
                f"model.{part}.dtype: float16 weights cannot train here (no loss scaling, updates underflow); "
                f"use bfloat16 (trained as float32 master weights, computed in bf16) or float32, or freeze "
                f"the {part}"
            )
        getattr(model, part).float()
        compute = LOW[dtype]
        log(f"model.{part}.dtype bfloat16: trained as float32 master weights, computed in bf16 (autocast)")
    return compute
