"""The declared requirements cover what the code uses, and bound what it was tested with."""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirement(name: str) -> Requirement:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def _bound(req: Requirement, op: str) -> Version:
    return Version(next(s.version for s in req.specifier if s.operator == op))


def test_the_minimum_torch_has_every_api_the_code_uses():
    """FSDP2's set_gradient_divide_factor / set_force_sum_reduction_for_comms (2.8), fully_shard (2.6),
    torch.distributed.tensor and sdpa's enable_gqa (2.5): the floor is the newest of them."""
    from torch.distributed import fsdp

    assert hasattr(fsdp, "fully_shard")
    FSDPModule = fsdp.FSDPModule
    assert hasattr(FSDPModule, "set_gradient_divide_factor")
    assert hasattr(FSDPModule, "set_force_sum_reduction_for_comms")
    req = _requirement("torch")
    assert _bound(req, ">=") >= Version("2.8")
    assert req.specifier.contains(torch.__version__.split("+")[0])


def test_transformers_is_bounded_at_the_tested_major_version():
    req = _requirement("transformers")
    installed = Version(transformers.__version__)
    assert req.specifier.contains(installed)
    assert _bound(req, "<") == Version(f"{installed.major + 1}")
