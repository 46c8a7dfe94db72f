"""Device choice: auto falls back to the CPU; a device that isn't there is a clear error."""

import pytest
import torch

from fusionlm.config import from_dict, validate
from fusionlm.device import resolve_device
from fusionlm.errors import ConfigError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected


def test_bad_device_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.device: 'gpu0' is not a device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"train\.device: 'cuda', but this machine has no CUDA GPU"):
        resolve_device("cuda")


def test_device_is_a_recipe_key():
    assert validate(from_dict({"train": {"device": "cpu"}})).train.device == "cpu"
