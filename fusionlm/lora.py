"""LoRA adapters (through peft) on the LLM and/or the encoder's tower, for one training stage.

A stage with ``lora:`` gets peft's LoRA layers injected *in place* into the named parts with
``peft.inject_adapter_in_model`` (no ``PeftModel`` wrapper: ``model.llm`` stays the transformers
model, so no ``base_model.model.`` prefix appears). peft renames an adapted layer's weight
``...q_proj.weight`` -> ``...q_proj.base_layer.weight`` and adds ``...q_proj.lora_A.default.weight``
and ``lora_B``; those names exist only while a LoRA stage runs:

* a checkpoint written mid-stage holds that unmerged state, with the LoRA settings in the
  safetensors metadata (``fusionlm_lora``); ``checkpoint.load_weights`` re-injects the adapters
  from it before loading (exact resume), and ``checkpoint.load_model`` then merges them, so eval,
  generation and export of a mid-stage checkpoint see a plain model;
* at the end of the stage the adapters are merged into the base weights (``merge``), so the
  stage's last checkpoint and every later stage have the original state-dict names; the adapter
  alone is saved beside that checkpoint, in peft's format, as ``adapter/<part>/`` (loadable with
  ``peft.PeftModel.from_pretrained(<the base part>, path)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import LoraConfig
from .errors import ConfigError

META_KEY = "fusionlm_lora"  # safetensors metadata: {part: settings} of the adapters in the weights
ADAPTER_DIR = "adapter"


def part_module(model: nn.Module, part: str) -> nn.Module:
    """The module LoRA adapts for ``part``: the LLM, or the encoder's transformers tower."""
    return model.llm if part == "llm" else model.encoder.tower


def all_linear(module: nn.Module) -> list[str]:
    """Suffix names of the module's linear layers, without the output head (peft's all-linear)."""
    from peft.tuners.lora import LoraLayer

    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules()
             if isinstance(m, (nn.Linear, LoraLayer)) and m is not head and name
             and not any(p == "base_layer" or p.startswith("lora_") for p in name.split("."))}
    if head is not None:
        head_name = next(n for n, m in module.named_modules() if m is head)
        names.discard(head_name.rsplit(".", 1)[-1])
    return sorted(names)


def settings(lora: LoraConfig, module: nn.Module) -> dict:
    """What a part's adapters are, with the target names resolved (recorded in checkpoints)."""
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "targets": sorted(lora.targets) if lora.targets else all_linear(module)}


def check_targets(model: nn.Module, lora: LoraConfig, *, key: str) -> None:
    """Refuse, before any training, targets that name no linear layer of a part."""
    for part in lora.parts:
        if not lora.targets:
            continue
        have = all_linear(part_module(model, part))
        missing = [t for t in lora.targets if t not in have]
        if missing:
            raise ConfigError(f"{key}.targets: {missing} fit no layer of the {part} (its linear layers: "
                              f"{', '.join(have)})")


def peft_config(s: dict):
    import peft

    return peft.LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                           target_modules=list(s["targets"]), bias="none")


def adapted(model: nn.Module) -> dict[str, dict]:
    """{part: settings} of the adapters now injected into ``model`` (empty: none)."""
    return model.adapters


def inject(model: nn.Module, parts: dict[str, dict], *, key: str = "lora") -> None:
    """Inject peft LoRA adapters into each part, as ``parts`` ({part: settings}) says."""
    import peft

    for part, s in parts.items():
        module = part_module(model, part)
        try:
            peft.inject_adapter_in_model(peft_config(s), module, adapter_name="default")
        except ValueError as exc:
            raise ConfigError(f"{key}.targets: {s['targets']} fit no layer of the {part} ({exc})") from None
    model.adapters = {**adapted(model), **parts}


def inject_for_stage(model: nn.Module, lora: LoraConfig | None, *, key: str = "lora") -> None:
    """Make the model's adapters the stage's: keep those already there when they match (a resumed
    stage), else merge any leftovers and inject fresh ones."""
    wanted = {} if lora is None else {p: settings(lora, part_module(model, p)) for p in lora.parts}
    if adapted(model) == wanted:
        return
    merge(model)
    if wanted:
        inject(model, wanted, key=key)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _lora_layers(module: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def adapter_state(model: nn.Module, part: str) -> dict[str, torch.Tensor]:
    """The part's adapter weights under the names ``PeftModel.save_pretrained`` writes
    (``base_model.model.<name>.lora_A.weight``: peft's own state dict of the adapted module, under
    the prefix its ``PeftModel`` wrapper would add)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(part_module(model, part), adapter_name="default")
    return {"base_model.model." + name: t.detach().cpu().contiguous() for name, t in state.items()}


def merge(model: nn.Module) -> dict[str, tuple[dict, dict]]:
    """Merge every adapter into its base weight and put the plain layers back. Returns
    {part: (settings, adapter state in peft's format)}, taken before merging (empty: none)."""
    taken = {}
    for part, s in adapted(model).items():
        taken[part] = (s, adapter_state(model, part))
        module = part_module(model, part)
        for name, layer in _lora_layers(module):
            layer.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in module.__dict__:
                delattr(module, attr)
    model.adapters = {}
    return taken


def save_adapters(taken: dict[str, tuple[dict, dict]], folder: str | Path) -> None:
    """Write each part's adapter in peft's format to ``folder/<part>/``."""
    for part, (s, state) in taken.items():
        out = Path(folder) / part
        out.mkdir(parents=True, exist_ok=True)
        peft_config(s).save_pretrained(str(out))
        save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata that lets a loader re-inject the adapters of ``model``."""
    parts = adapted(model)
    return {META_KEY: json.dumps(parts)} if parts else {}


def prepare_load(model: nn.Module, meta: dict[str, str] | None, state: dict) -> None:
    """Before loading weights saved mid LoRA stage: inject the adapters they hold (and no others)."""
    parts = json.loads((meta or {}).get(META_KEY, "{}"))
    if adapted(model) != parts:
        merge(model)
        if parts:
            inject(model, parts)
