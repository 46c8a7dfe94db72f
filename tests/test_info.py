"""`fusionlm info`: parameters, image tokens and FLOPs per part, for every design."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fusionlm.cli import main
from fusionlm.config import from_dict, validate
from fusionlm.info import report
from helpers_train import tiny_dict, write_recipe


def recipe(fusion: str, **model):
    data = tiny_dict()
    data["model"]["fusion"] = {"kind": fusion, "every_n": 1}
    if fusion == "fuyu":
        data["model"]["encoder"] = {"kind": "patches", "image_size": 16, "patch_size": 4}
    data["model"]["llm"]["max_length"] = 256
    data["model"].update(model)
    data["stages"] = [
        {"name": "connector_only", "train": ["connector"], "mixture": {"color": 1, "caption": 1}},
        {"name": "all", "train": ["all"], "mixture": {"color": 1, "caption": 1}},
    ]
    return validate(from_dict(data))


@pytest.mark.parametrize("fusion, tiling, decoder_tokens", [
    ("unified", {}, 16), ("cross_attention", {}, 1), ("fuyu", {}, 20),
    ("unified", {"max_tiles": 2, "marker": "none"}, 16 * 2),  # square 32-px scenes: one tile + the thumbnail
    ("hybrid", {"max_tiles": 2, "marker": "none"}, 16),  # only the thumbnail is in the sequence
])
def test_report_per_design(fusion, tiling, decoder_tokens):
    config = recipe(fusion, **({"tiling": tiling} if tiling else {}))
    r = report(config)
    assert r.decoder_tokens == decoder_tokens
    assert r.encoder_tokens == (16 * 2 if tiling else 16)
    assert r.params["llm"] > 0 and (r.params["cross_attention"] > 0) == (fusion in ("cross_attention", "hybrid"))
    assert r.forward["llm"] > 0 and r.forward["connector"] > 0
    assert (r.forward["cross_attention"] > 0) == (fusion in ("cross_attention", "hybrid"))
    # the decoder's matmuls: at least 2 FLOPs per weight per token
    assert r.forward["llm"] >= 2 * (r.params["llm"] - 400 * 32) * r.sample_length * 0.9
    # a frozen LLM with a trainable connector before it: forward + activation gradients
    assert r.training["connector_only"]["llm"] == pytest.approx(2 * r.forward["llm"])
    assert r.training["connector_only"]["connector"] == pytest.approx(3 * r.forward["connector"])
    assert r.training["connector_only"]["encoder"] == pytest.approx(r.forward["encoder"])
    assert r.training["all"]["llm"] == pytest.approx(3 * r.forward["llm"])


def test_tiling_costs_more_encoder_flops_than_one_image():
    one, tiled = report(recipe("unified")), report(recipe("unified", tiling={"max_tiles": 2}))
    assert tiled.images_per_sample == pytest.approx(2 * one.images_per_sample)  # a tile and a thumbnail each
    assert tiled.forward["encoder"] == pytest.approx(2 * one.forward["encoder"], rel=0.01)


def test_cli_info_prints_a_table_per_recipe(tmp_path, capsys):
    a = write_recipe(tmp_path / "a.yaml")
    data = tiny_dict()
    data["model"]["fusion"] = {"kind": "cross_attention"}
    b = write_recipe(tmp_path / "b.yaml", data)
    assert main(["info", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "## " + str(a) + " (unified)" in out and "## " + str(b) + " (cross_attention)" in out
    assert "| cross_attention |" in out and "forward MFLOPs/sample" in out


def test_attention_products_count_on_cpu():
    """torch counts FLOPs only for the GPU kernels of scaled_dot_product_attention; fusionlm.info
    registers the CPU kernel (forward and backward) with torch's own formulas."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusionlm.info import count_cpu_attention

    count_cpu_attention()
    count_cpu_attention()  # idempotent
    b, h, h_kv, t, s, hd = 2, 4, 2, 7, 5, 8
    q = torch.randn(b, h, t, hd, requires_grad=True)
    k, v = (torch.randn(b, h_kv, s, hd, requires_grad=True) for _ in range(2))
    with FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert counter.get_total_flops() == 2 * b * h * t * s * hd * 2  # q·kᵀ and p·v
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 5 * 2 * b * h * t * s * hd  # scores again, then 4 gradient products


def test_llm_flops_include_attention():
    """Doubling a text-only sequence doubles the per-token (linear) FLOPs; what is left over is the
    attention products, quadratic in the length: layers × 2·2·heads·head_dim·((2T)² − 2T²)."""
    from fusionlm.checkpoint import build_model
    from fusionlm.data.sources import build_source
    from fusionlm.info import forward_flops
    from fusionlm.recipe import make_tokenizer

    config = recipe("unified")
    torch.manual_seed(0)
    model = build_model(config, make_tokenizer(config, build_source(config.data)), pretrained=False).eval()
    llm = config.model.llm
    flops = {t: forward_flops(model, SimpleNamespace(pixels=None, attention_mask=None, drawn=None, noise=None, times=None,
                                                     input_ids=torch.arange(10, 10 + t)[None]))["llm"]
             for t in (16, 32)}
    head_dim = llm.hidden_size // llm.num_heads
    assert flops[32] - 2 * flops[16] == llm.num_layers * 2 * 2 * llm.num_heads * head_dim * (32**2 - 2 * 16**2)
