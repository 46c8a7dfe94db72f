"""LoRA stages through peft: only adapters (and the named parts) train, base weights stay bitwise
frozen, the stage's end merges the adapters (original state-dict names), the adapter alone is
saved in peft's format, mid-stage checkpoints resume exactly and load merged."""

from __future__ import annotations

import json

import pytest
import torch

import fusionlm.lora as lora_mod
from fusionlm.checkpoint import _unique_state, build_model, load_model, load_state
from fusionlm.config import from_dict, validate
from fusionlm.errors import ConfigError
from fusionlm.train.loop import Trainer, train
from tests.helpers_train import checkpoints, interrupt_after as _interrupt_after, read_metrics, stage, tiny_dict, weights


def quiet(*_args, **_kw) -> None:
    pass


def lora_stage(parts=("llm",), steps=20, train_=("connector",), **lora) -> dict:
    return stage("lora", train=list(train_), steps=steps, lr=3e-2, warmup_steps=2,
                 lora={"parts": list(parts), "r": 4, "alpha": 8, **lora})


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).logits
    model.train()
    return out


def run_and_capture(tmp_path, monkeypatch, stg: dict):
    """Train one LoRA stage; capture the model's state and logits just before and after the merge."""
    config = from_dict(tiny_dict(stages=[stg]))
    lines = []
    trainer = Trainer(config, tmp_path / "run", log=lambda s: lines.append(str(s)))
    initial = {k: v.detach().clone() for k, v in _unique_state(trainer.model.state_dict()).items()}
    batch = next(trainer._batches(0, config.stages[0], 0))
    seen = {}
    original = lora_mod.merge

    def capture(model):
        if lora_mod.adapted(model):
            seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            seen["unmerged"] = logits(model, batch)
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        out = original(model)
        if out:
            seen["merged"] = logits(model, batch)
        return out

    monkeypatch.setattr(lora_mod, "merge", capture)
    trainer.run()
    return trainer, initial, batch, seen, lines


def test_lora_on_the_llm_trains_adapters_only_and_merges(tmp_path, monkeypatch):
    trainer, initial, batch, seen, lines = run_and_capture(tmp_path, monkeypatch, lora_stage())
    state = seen["state"]
    lora_names = {k for k in state if lora_mod.is_lora_param(k)}
    assert lora_names and all(k.startswith("llm.") for k in lora_names)
    # trainable: the adapters and the connector, nothing else
    assert seen["trainable"] == lora_names | {k for k in state if k.startswith("connector.")}
    # base weights bitwise unchanged (peft's base_layer names map back to the original ones)
    for name, value in state.items():
        if lora_mod.is_lora_param(name):
            continue
        orig = name.replace(".base_layer.", ".")
        if orig in initial and not orig.startswith("connector."):
            assert torch.equal(value, initial[orig]), name
    assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith("connector."))
    assert all(state[k].abs().sum() > 0 for k in lora_names if ".lora_B." in k)  # B starts at zero
    # the optimizer holds only adapter + connector tensors
    ckpt = checkpoints(tmp_path / "run")[-1]
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    assert len(opt["state"]) == len(seen["trainable"])
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(seen["trainable"])
    # the loss falls (a random tiny LLM with a frozen tied head plateaus near 5.75 from 6.0)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.15, losses
    # trainable fraction, logged per part
    table = next(line for line in lines if line.startswith("part"))
    assert "llm (lora)" in table
    # the checkpoint: exactly the original keys; weights = base + merged delta
    saved = weights(ckpt)
    assert set(saved) == set(initial)
    scale = 8 / 4
    adapted = {k.split(".lora_A.")[0] for k in lora_names if ".lora_A." in k}
    for mod in adapted:
        a, b = state[f"{mod}.lora_A.default.weight"], state[f"{mod}.lora_B.default.weight"]
        torch.testing.assert_close(saved[f"{mod}.weight"], initial[f"{mod}.weight"] + scale * b @ a,
                                   rtol=0, atol=1e-6)
    assert not any(".base_layer." in k or "lora_" in k for k in trainer.model.state_dict())
    torch.testing.assert_close(seen["merged"], seen["unmerged"], rtol=0, atol=1e-5)
    # load_model sees the same plain model
    model, _, _ = load_model(ckpt)
    torch.testing.assert_close(logits(model, batch), seen["merged"], rtol=0, atol=1e-5)
    # the adapter alone, loaded with peft onto the base LLM, gives the same logits
    from peft import PeftModel

    base = dict(saved)
    base.update({k: v for k, v in initial.items() if k.startswith("llm.")})
    fresh = build_model(trainer.config, trainer.tokenizer, pretrained=False)
    load_state(fresh, base, "base")
    PeftModel.from_pretrained(fresh.llm, str(ckpt / "adapter" / "llm"))  # injects into fresh.llm in place
    torch.testing.assert_close(logits(fresh, batch), seen["unmerged"], rtol=0, atol=1e-5)
    cfg = json.loads((ckpt / "adapter" / "llm" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_lora_on_the_encoder_tower(tmp_path, monkeypatch):
    stg = lora_stage(parts=["encoder"], steps=4, train_=[], targets=["q_proj", "v_proj"])
    trainer, initial, batch, seen, _ = run_and_capture(tmp_path, monkeypatch, stg)
    lora_names = {k for k in seen["state"] if lora_mod.is_lora_param(k)}
    assert lora_names and all(k.startswith("encoder.tower.") for k in lora_names)
    assert {k.split(".")[-4] for k in lora_names} == {"q_proj", "v_proj"}
    assert seen["trainable"] == lora_names
    for name, value in seen["state"].items():
        orig = name.replace(".base_layer.", ".")
        if not lora_mod.is_lora_param(name) and orig in initial:
            assert torch.equal(value, initial[orig]), name
    ckpt = checkpoints(tmp_path / "run")[-1]
    assert set(weights(ckpt)) == set(initial)
    assert (ckpt / "adapter" / "encoder" / "adapter_model.safetensors").is_file()
    torch.testing.assert_close(seen["merged"], seen["unmerged"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora, key", [
    ({"parts": ["decoder"]}, "stages.0.lora.parts"),
    ({"parts": []}, "stages.0.lora.parts"),
    ({"r": 0}, "stages.0.lora.r"),
    ({"alpha": -1}, "stages.0.lora.alpha"),
    ({"dropout": 1.5}, "stages.0.lora.dropout"),
    ({"targets": []}, "stages.0.lora.targets"),
    ({"rank": 4}, "stages.0.lora"),
    ({"r": "eight"}, "stages.0.lora.r"),
])
def test_bad_lora_option_names_the_key(lora, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(from_dict(tiny_dict(stages=[stage("s", lora=lora)])))


def test_lora_part_also_fully_trained_is_refused():
    with pytest.raises(ConfigError, match=r"stages\.0\.lora\.parts"):
        validate(from_dict(tiny_dict(stages=[stage("s", train=["llm"], lora={"parts": ["llm"]})])))


def test_unknown_target_is_a_config_error_before_any_step(tmp_path):
    first = stage("plain", steps=2)
    config = from_dict(tiny_dict(stages=[first, lora_stage(steps=1, targets=["nope_proj"])]))
    with pytest.raises(ConfigError, match=r"stages\.1\.lora\.targets: \['nope_proj'\] fit no layer of the llm"):
        train(config, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before stage 0 trained


def test_resume_mid_lora_stage_reproduces_the_run(tmp_path, monkeypatch):
    stages = [lora_stage(steps=6), stage("after", train=["connector"], steps=2)]
    data = tiny_dict(stages=stages, train={"checkpoint_every": 3})
    train(from_dict(data), tmp_path / "a", log=quiet)
    with monkeypatch.context() as m:
        _interrupt_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            train(from_dict(data), tmp_path / "b", log=quiet)
    # the mid-stage checkpoint holds the unmerged adapters; load_model merges them
    mid = checkpoints(tmp_path / "b")[-1]
    assert any(".lora_A." in k for k in weights(mid))
    model, _, _ = load_model(mid)
    assert not any("lora_" in k for k in model.state_dict())
    lines = []
    train(from_dict(data), tmp_path / "b", resume=True, log=lambda s: lines.append(str(s)))
    assert any("resuming from" in line for line in lines)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
    wa, wb = weights(checkpoints(tmp_path / "a")[-1]), weights(checkpoints(tmp_path / "b")[-1])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


def test_resume_of_a_finished_lora_run_changes_nothing(tmp_path, capsys):
    """The stage's last checkpoint resumes at the next stage, here at nothing: --resume says so and
    leaves the trained adapter, the weights and the metrics as they are (it used to re-enter the
    stage, inject fresh adapters and save an untrained adapter over the trained one)."""
    from fusionlm.cli import main
    from tests.helpers_train import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_dict(stages=[lora_stage(steps=3)]))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    ckpt = checkpoints(tmp_path / "run")[-1]
    adapter = {p.relative_to(ckpt): p.read_bytes() for p in (ckpt / "adapter").rglob("*") if p.is_file()}
    before, metrics = weights(ckpt), (tmp_path / "run" / "metrics.jsonl").read_text()
    assert json.loads((ckpt / "trainer.json").read_text())["stage"] == 1
    capsys.readouterr()
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "finished at step 3" in capsys.readouterr().out
    assert checkpoints(tmp_path / "run") == [ckpt]
    assert {p.relative_to(ckpt): p.read_bytes() for p in (ckpt / "adapter").rglob("*") if p.is_file()} == adapter
    after = weights(ckpt)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
