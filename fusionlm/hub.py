"""Pretrained parts: a hub id or a local directory, loaded the same way for every part.

A part built from ``hf`` records its full transformers config in the recipe (``arch``), so a saved
checkpoint is rebuilt from its own ``config.yaml`` with no download and no original files.
Checkpoints that ship their own Python code (``auto_map``) are refused unless the part's
``allow_custom_code`` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def check_custom_code(source: str, *, allow: bool, key: str) -> dict[str, Any]:
    """Refuse a checkpoint whose config points at code of its own, unless ``allow``; returns the config dict."""
    try:
        raw, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read a transformers config from {source!r} ({_first_line(exc)})") from None
    if raw.get("auto_map") and not allow:
        raise ConfigError(
            f"{key}: {source!r} ships its own model code (auto_map: {sorted(raw['auto_map'])}); "
            f"fusionlm does not run it unless you set {key.rsplit('.', 1)[0]}.allow_custom_code: true"
        )
    return raw


def load_pretrained(model_cls: Any, source: str, *, dtype: str, allow_custom_code: bool, key: str,
                    model_types: tuple[str, ...] = ()):
    """``model_cls.from_pretrained(source)`` with the part's dtype, errors naming the recipe key.

    ``model_types``: the checkpoint model types this part accepts (empty: any).
    """
    raw = check_custom_code(source, allow=allow_custom_code, key=key)
    found = raw.get("model_type")
    if model_types and found not in model_types:
        raise ConfigError(f"{key}: {source!r} is a {found!r} checkpoint, not one of {', '.join(model_types)} "
                          f"(set {key.rsplit('.', 1)[0]}.kind to match it)")
    try:
        return model_cls.from_pretrained(source, dtype=torch_dtype(dtype), trust_remote_code=allow_custom_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load {source!r} ({_first_line(exc)})") from None


def load_part_of(model_cls: Any, source: str, raw: dict[str, Any], *, sub_config: str, prefixes: tuple[str, ...],
                 key: str):
    """A part that a whole checkpoint holds (Janus's or Emu3's VQ model inside the full model):
    built from the ``sub_config`` of the checkpoint's config ``raw`` (``check_custom_code``'s),
    with the weights under the first of ``prefixes`` the checkpoint has. Only the files that hold
    them are read (or downloaded)."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    settings = raw.get(sub_config)
    if not isinstance(settings, dict):
        raise ConfigError(f"{key}: {source!r} has no {sub_config} to build the part from")
    part = model_cls(config_from_arch({"model_type": model_cls.config_class.model_type, **settings}, key=key))
    try:
        index = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        names = json.loads(Path(index).read_text())["weight_map"] if index else None  # weight -> its shard
        state: dict[str, torch.Tensor] = {}
        for prefix in prefixes:
            files = sorted({f for k, f in names.items() if k.startswith(prefix)}) if names else ["model.safetensors"]
            for name in files:
                with safe_open(cached_file(source, name), framework="pt") as f:
                    state.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
            if state:
                break
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read the weights of {source!r} ({_first_line(exc)})") from None
    expected = set(part.state_dict())
    if not state or set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(f"{key}: {source!r} does not hold the weights of its {sub_config} under "
                          f"{' or '.join(prefixes)} ({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unexpected)")
    part.load_state_dict(state)
    return part


def config_from_arch(arch: dict[str, Any], *, key: str) -> PretrainedConfig:
    """A transformers config from a recorded ``arch`` dict."""
    data = dict(arch)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{key}: the recorded architecture has no model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: cannot rebuild a {model_type!r} config ({_first_line(exc)})") from None


def arch_of(config: PretrainedConfig) -> dict[str, Any]:
    """What ``arch`` records of a loaded part: its config as a plain dict."""
    data = config.to_dict()
    for noise in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        data.pop(noise, None)
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
