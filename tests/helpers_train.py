"""Tiny recipes and small readers shared by test_config, test_train and test_cli (not a test file)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

# A model of ~50k parameters that trains 30 steps in about a second on one core.
TINY: dict[str, Any] = {
    "model": {
        "encoder": {"kind": "siglip", "image_size": 16, "patch_size": 4, "hidden_size": 32, "num_layers": 1,
                    "num_heads": 2, "intermediate_size": 64},
        "connector": {"kind": "mlp"},
        "llm": {"kind": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                "intermediate_size": 64, "max_length": 128},
        "fusion": {"kind": "unified"},
        "tokenizer": {"vocab_size": 400, "corpus_per_task": 20},
        "video": {"temporal_pool": 2},  # a motion clip: 4 slots x 16 tokens, inside the 128-token context
    },
    "data": {"source": "synthetic", "world_image_size": 32},
    "train": {"seed": 0, "eval_per_task": 3},
    "stages": [
        {"name": "s0", "train": ["all"], "mixture": {"color": 1, "shape": 1}, "steps": 6, "lr": 3.0e-3,
         "warmup_steps": 2, "batch_size": 4},
    ],
}

# The same sizes as --set overrides (for the shipped demo recipe).
TINY_OVERRIDES = [
    "model.encoder.image_size=16", "model.encoder.hidden_size=32", "model.encoder.num_layers=1",
    "model.encoder.num_heads=2", "model.encoder.intermediate_size=64",
    "model.llm.hidden_size=32", "model.llm.num_layers=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=2",
    "model.llm.intermediate_size=64", "model.llm.max_length=128",
    "model.tokenizer.vocab_size=400", "model.tokenizer.corpus_per_task=20", "data.world_image_size=32",
    "model.video.temporal_pool=2",
]


def tiny_dict(**sections: Any) -> dict:
    """A deep copy of TINY; keyword arguments replace whole top-level sections or merge dicts."""
    data = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def stage(name: str = "s", **kw: Any) -> dict:
    out = copy.deepcopy(TINY["stages"][0])
    out["name"] = name
    out.update(kw)
    return out


def write_recipe(path: Path, data: dict | None = None) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(data if data is not None else tiny_dict(), sort_keys=False))
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(run: Path) -> list[Path]:
    return sorted((Path(run) / "checkpoints").glob("step-*"))


def weights(ckpt: Path) -> dict:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def same_tensors(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, f"no tensor starts with {prefix!r}"
    return all(k in b and a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in keys)


def interrupt_after(monkeypatch, step: int) -> None:
    """Make training stop (as a kill would) right after logging optimizer step ``step``."""
    from fusionlm.train.loop import Trainer

    original = Trainer._log_step

    def log_then_die(self, *args, **kw):
        original(self, *args, **kw)
        if self.progress.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_log_step", log_then_die)
