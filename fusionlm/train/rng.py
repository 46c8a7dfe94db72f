"""A process's random state, saved in every checkpoint and restored on resume."""

from __future__ import annotations

import torch


def rng_state() -> dict:
    """This process's random state: the CPU's and, when there is one, every GPU's."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
