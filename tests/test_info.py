"""`fusionlm info`: parameters, image tokens and FLOPs per part, for every design."""

from __future__ import annotations

import pytest

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
