"""Recipes: strict YAML <-> dataclasses, --set overrides, and errors that name the key at fault."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusionlm.checkpoint import build_model
from fusionlm.cli import main
from fusionlm.config import (
    DataConfig,
    EncoderConfig,
    LLMConfig,
    ModelConfig,
    RecipeConfig,
    StageConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    load_recipe,
    save_config,
    shipped_recipes,
)
from fusionlm.connectors import CONNECTORS
from fusionlm.designs import DESIGNS
from fusionlm.data.tokenizer import train_tokenizer
from fusionlm.encoders import ENCODERS
from fusionlm.errors import ConfigError
from fusionlm.llm import LLMS
from tests.helpers_train import stage, tiny_dict, write_recipe


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["what colour is the shape? red blue green. a circle, a square."] * 20
    return train_tokenizer(corpus, 300)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return str(info.value)


# ----------------------------------------------------------------------------- round trip


def test_yaml_round_trip_keeps_every_field(tmp_path):
    config = RecipeConfig(
        model=ModelConfig(encoder=EncoderConfig(kind="clip", image_size=24, patch_size=6, drop_cls=False),
                          llm=LLMConfig(hidden_size=48, vocab_size=123, hf=None, tie_embeddings=False)),
        data=DataConfig(source="some/file.json", image_root="imgs", max_bad_fraction=0.25),
        train=TrainConfig(seed=7, bf16=True, checkpoint_every=3, grad_clip=0.5),
        stages=[StageConfig(name="a", train=["connector"], mixture={"caption": 1.0}, steps=4),
                StageConfig(name="b", train=["llm", "llm.model.layers.0.*"], mixture={"color": 0.5, "shape": 2.0},
                            steps=9, lr=1e-4, grad_accum=2)],
    )
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    # plain YAML (no Python tags): any YAML reader can read it
    assert "!!python" not in path.read_text()
    assert yaml.safe_load(path.read_text())["stages"][1]["mixture"] == {"color": 0.5, "shape": 2.0}


def test_missing_keys_take_defaults_and_ints_widen_to_floats():
    config = from_dict({"stages": [{"lr": 1, "steps": 3}]})
    assert config.model == ModelConfig() and config.train == TrainConfig()
    assert config.stages[0].lr == 1.0 and isinstance(config.stages[0].lr, float)
    assert config.stages[0].batch_size == StageConfig().batch_size


def test_shipped_recipes_load():
    assert "demo" in shipped_recipes()
    for name in shipped_recipes():
        assert isinstance(load_recipe(name), RecipeConfig)


# ----------------------------------------------------------------------------- unknown keys, types


@pytest.mark.parametrize("data, where, cls", [
    ({"modle": {}}, None, RecipeConfig),
    ({"model": {"encoder": {"patch": 4}}}, "model.encoder", EncoderConfig),
    ({"model": {"llm": {"hidden": 4}}}, "model.llm", LLMConfig),
    ({"train": {"bf_16": True}}, "train", TrainConfig),
    ({"data": {"sauce": "x"}}, "data", DataConfig),
    ({"stages": [{}, {"stepz": 3}]}, "stages.1", StageConfig),
])
def test_unknown_key_at_any_depth_is_named_with_the_allowed_keys(data, where, cls):
    msg = _config_error(data)
    bad = next(iter(_leaf_keys(data)))
    assert f"unknown key {bad!r}" in msg
    if where:
        assert msg.startswith(f"{where}:")
    assert all(name in msg for name in _fields(cls)), msg


def _leaf_keys(data):
    """The misspelt key (the deepest key of the one path through ``data``)."""
    node = data
    while True:
        if isinstance(node, list):
            node = node[-1]
            continue
        (key, value), = node.items()
        if isinstance(value, (dict, list)) and value:
            node = value
            continue
        yield key
        return


@pytest.mark.parametrize("data, key, detail", [
    ({"stages": [{"steps": "ten"}]}, "stages.0.steps", "'ten'"),
    ({"train": {"bf16": 3}}, "train.bf16", "3"),
    ({"train": {"seed": True}}, "train.seed", "True"),
    ({"stages": [{"mixture": {"color": "lots"}}]}, "stages.0.mixture.color", "'lots'"),
    ({"stages": [{"train": "connector"}]}, "stages.0.train", "list"),
    ({"model": {"encoder": 5}}, "model.encoder", "mapping"),
    ({"model": {"llm": {"hf": 3}}}, "model.llm.hf", "3"),
])
def test_wrong_type_names_the_key(data, key, detail):
    msg = _config_error(data)
    assert msg.startswith(f"{key}:"), msg
    assert detail in msg


def test_load_recipe_prefixes_the_file_and_rejects_non_mapping(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_dict(train={"bf16": 3}))
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.bf16: expected bool"):
        load_recipe(path)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("model: {encoder: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such recipe.*demo"):
        load_recipe(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- --set overrides


def test_set_overrides_apply_to_lists_and_nested_keys(tmp_path):
    path = write_recipe(tmp_path / "r.yaml")
    config = load_recipe(path, ["stages.0.steps=20", "model.llm.hidden_size=64", "train.bf16=true",
                                "stages.0.mixture={caption: 2}", "stages.0.train=[connector, llm]",
                                "data.source=synthetic", "model.llm.hf=null"])
    assert config.stages[0].steps == 20
    assert config.model.llm.hidden_size == 64
    assert config.train.bf16 is True
    assert config.stages[0].mixture == {"caption": 2.0}
    assert config.stages[0].train == ["connector", "llm"]
    assert config.model.llm.hf is None
    # untouched values stay as written
    assert config.model.encoder.image_size == 16


def test_set_overrides_type_checked_like_the_file(tmp_path):
    path = write_recipe(tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match=r"stages\.0\.steps: expected int, got str 'ten'"):
        load_recipe(path, ["stages.0.steps=ten"])


@pytest.mark.parametrize("override, match", [
    ("model.llm.nope.deeper=1", r"model\.llm: unknown key 'nope' \(allowed: kind, hf, hidden_size"),
    ("model.llm.hiden_size=1", r"model\.llm: unknown key 'hiden_size'"),
    ("stages.3.steps=1", r"stages\.3: '3' is not an index of a list of length 1"),
    ("stages.x.steps=1", r"stages\.x: 'x' is not an index"),
    ("model.llm.hidden_size.x=1", r"model\.llm\.hidden_size: cannot set a key inside a int"),
    ("stages.0.steps", r"expected dotted\.key=value"),
])
def test_bad_overrides_name_the_key(tmp_path, override, match):
    path = write_recipe(tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match=match):
        load_recipe(path, [override])


def test_apply_overrides_does_not_touch_other_stages():
    data = {"stages": [{"steps": 1}, {"steps": 2}]}
    apply_overrides(data, ["stages.1.steps=5"])
    assert data == {"stages": [{"steps": 1}, {"steps": 5}]}


# ----------------------------------------------------------------------------- component names


@pytest.mark.parametrize("key, registry", [
    ("connector", CONNECTORS), ("encoder", ENCODERS), ("llm", LLMS),
])
def test_unknown_component_lists_known_names(tmp_path, tokenizer, key, registry):
    config = load_recipe(write_recipe(tmp_path / "r.yaml"), [f"model.{key}.kind=foo"])
    with pytest.raises(ConfigError) as info:
        build_model(config, tokenizer)
    msg = str(info.value)
    assert msg.startswith(f"model.{key}.kind: unknown ") and "'foo'" in msg
    assert registry.names() and all(name in msg for name in registry.names())


def test_known_components_build(tmp_path, tokenizer):
    config = load_recipe(write_recipe(tmp_path / "r.yaml"))
    model = build_model(config, tokenizer)
    assert model.llm.config.vocab_size == len(tokenizer)


def test_unknown_fusion_lists_known_names(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml"), ["model.fusion.kind=foo"])
    msg = str(info.value)
    assert "model.fusion.kind" in msg and "'foo'" in msg
    assert all(kind in msg for kind in DESIGNS.names())


def test_fuyu_needs_the_patches_encoder(tmp_path):
    path = write_recipe(tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match=r"model\.encoder\.kind: .*'patches'.*'siglip'.*'fuyu'"):
        load_recipe(path, ["model.fusion.kind=fuyu"])
    with pytest.raises(ConfigError, match=r"model\.encoder\.kind"):
        load_recipe(path, ["model.encoder.kind=patches"])  # patches without fuyu
    config = load_recipe(path, ["model.fusion.kind=fuyu", "model.encoder.kind=patches"])
    assert config.model.fusion.kind == "fuyu"


@pytest.mark.parametrize("override, match", [
    ("model.encoder.image_size=18", r"model\.encoder\.image_size: 18 is not a multiple of patch_size 4"),
    ("stages.0.mixture={}", r"stages\.0\.mixture: needs at least one positive weight"),
    ("stages.0.mixture={color: -1, shape: 2}", r"stages\.0\.mixture"),
    ("stages.0.train=[]", r"stages\.0\.train: name at least one part"),
    ("stages.0.batch_size=0", r"stages\.0: "),
    ("stages=[]", r"stages: at least one stage"),
    ("model.fusion.every_n=0", r"model\.fusion\.every_n"),
])
def test_semantic_checks_name_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(write_recipe(tmp_path / "r.yaml"), [override])


# ----------------------------------------------------------------------------- through `fusionlm train`


def _train_fails(tmp_path, capsys, data: dict, *extra: str) -> str:
    recipe = write_recipe(tmp_path / "r.yaml", data)
    rc = main(["train", str(recipe), "--out", str(tmp_path / "run"), *extra])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusionlm: error: "), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "failed before step 0"
    return lines[0]


def test_cli_unknown_connector_is_one_line(tmp_path, capsys):
    line = _train_fails(tmp_path, capsys, tiny_dict(), "--set", "model.connector.kind=foo")
    assert "model.connector.kind" in line and "'foo'" in line and "mlp" in line


def test_cli_unknown_task_in_mixture(tmp_path, capsys):
    line = _train_fails(tmp_path, capsys, tiny_dict(), "--set", "stages.0.mixture={colour: 1}")
    assert "stages.0.mixture" in line and "'colour'" in line and "color" in line


def test_cli_typo_in_stage_train_list(tmp_path, capsys):
    line = _train_fails(tmp_path, capsys, tiny_dict(), "--set", "stages.0.train=[conector]")
    assert "stages.0.train" in line and "'conector'" in line and "connector" in line


def test_cli_typo_in_a_later_stage_fails_before_step_0(tmp_path, capsys):
    """A mistake in stage 1 must not cost stage 0's training time."""
    data = tiny_dict(stages=[stage("a"), stage("b", train=["conector"])])
    line = _train_fails(tmp_path, capsys, data)
    assert "stages.1.train" in line and "'conector'" in line


def test_cli_unknown_task_in_a_later_stage_fails_before_step_0(tmp_path, capsys):
    data = tiny_dict(stages=[stage("a"), stage("b", mixture={"colour": 1.0})])
    line = _train_fails(tmp_path, capsys, data)
    assert "stages.1.mixture" in line and "'colour'" in line


def test_cli_unknown_key_in_file(tmp_path, capsys):
    data = tiny_dict()
    data["model"]["encoder"]["patch"] = 4
    line = _train_fails(tmp_path, capsys, data)
    assert "r.yaml" in line and "model.encoder: unknown key 'patch'" in line and "patch_size" in line


def test_cli_subprocess_exit_2_without_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("fusionlm")), "train", str(recipe), "--out", str(tmp_path / "run"),
         "--set", "model.connector.kind=foo"],
        capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.connector.kind" in lines[0] and "'foo'" in lines[0], proc.stderr


def test_exponent_floats_without_a_dot_are_floats():
    """YAML 1.1 reads ``1e-2`` as a string; a float key takes it as 0.01 (in files and --set alike)."""
    from fusionlm.config import from_dict

    assert from_dict({"stages": [{"lr": "1e-2"}]}).stages[0].lr == 0.01
    with pytest.raises(ConfigError, match=r"stages\.0\.lr: expected float, got str 'fast'"):
        from_dict({"stages": [{"lr": "fast"}]})
