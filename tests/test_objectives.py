"""Stage objectives (lm, contrastive), per-part learning rates, and every shipped recipe."""

from __future__ import annotations

import json

import pytest
import torch

from fusionlm.config import load_recipe, shipped_recipes
from fusionlm.errors import ConfigError
from fusionlm.train.loop import train
from fusionlm.train.objectives import contrastive_loss, lm_loss
from fusionlm.train.stages import apply_trainable, param_groups
from tests.conftest import make_batch
from tests.helpers_train import TINY_OVERRIDES


def test_contrastive_trains_only_the_chosen_parts_and_falls(make_model, tokenizer, world):
    model = make_model("unified").train()
    samples = [world.sample("caption", "train", i) for i in range(8)]
    batch = make_batch(model, tokenizer, samples)
    params = apply_trainable(model, ["encoder", "connector"], log=lambda *_: None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(40):
        loss = contrastive_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for name, p in model.named_parameters():
        if model.part_of(name) == "llm":
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
    assert not torch.equal(model.connector.linear_1.weight, before["connector.linear_1.weight"])
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("encoder."))


def test_contrastive_refuses_batches_without_one_image_per_sample(make_model, tokenizer, world):
    model = make_model("unified")
    batch = make_batch(model, tokenizer, [world.sample("price", "train", 0), world.sample("color", "train", 0)])
    with pytest.raises(ConfigError, match="exactly one image per sample"):
        contrastive_loss(model, batch)


def test_contrastive_matches_image_to_its_own_text(make_model, tokenizer, world):
    """After fitting, each image's vector is closest to its own caption's among the batch."""
    model = make_model("unified").train()
    samples = [world.sample("caption", "train", i) for i in range(6)]
    batch = make_batch(model, tokenizer, samples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = contrastive_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(contrastive_loss(model, batch).detach()) < 0.3


def test_lm_loss_is_the_models_loss(make_model, tokenizer, world):
    model = make_model("unified")
    batch = make_batch(model, tokenizer, [world.sample("color", "train", 0)])
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                labels=batch.labels)
    assert torch.equal(lm_loss(model, batch), out.loss)


def test_param_groups_scale_each_part(make_model):
    model = make_model("cross_attention")
    params = apply_trainable(model, ["all"], log=lambda *_: None)
    groups = param_groups(model, params, 1e-3, {"encoder": 0.1, "cross_attention": 2.0})
    lrs = {g["part"]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"encoder": 1e-4, "connector": 1e-3, "llm": 1e-3, "cross_attention": 2e-3})
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_unknown_objective_and_lr_scale_part_are_config_errors():
    with pytest.raises(ConfigError, match="stages.0.objective"):
        load_recipe("demo", ["stages.0.objective=clip"])
    with pytest.raises(ConfigError, match="stages.2.lr_scale"):
        load_recipe("demo", ["stages.2.lr_scale={vision: 0.1}"])


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_trains_with_falling_loss(name, tmp_path):
    """Each recipe's stages run at tiny scale; the loss of its last stage falls (a recipe that draws:
    each kind's, text and pictures, since a batch's mix of the two moves the total)."""
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("model.llm.max_length")]  # tiled recipes need room
    config = load_recipe(name, tiny + ["model.encoder.patch_size=4"])
    for s in config.stages:
        s.steps, s.warmup_steps, s.batch_size = 2, 1, 4
    last = config.stages[-1]
    last.steps, last.lr = 25, 5e-3
    train(config, tmp_path / name, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == sum(s.steps for s in config.stages)
    mine = [r for r in rows if r["stage"] == len(config.stages) - 1]
    for key in ("loss_text", "loss_image") if config.model.generation.kind != "none" else ("loss",):
        losses = [r[key] for r in mine if r.get(key) is not None]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (key, losses)
