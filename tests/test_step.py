"""One optimizer step, exactly: token-level accumulation, non-finite gradients, clipping switched
off, float32 master weights for low-precision parts, the random state a checkpoint keeps, and
activation checkpointing."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from fusionlm.config import from_dict, validate
from fusionlm.data.world import World
from fusionlm.errors import ConfigError
from fusionlm.train.loop import Trainer, train
from fusionlm.train.schedule import lr_lambda
from tests.conftest import make_batch
from tests.helpers_train import checkpoints, read_metrics, same_tensors, stage, tiny_dict, weights


def quiet(*_args, **_kw) -> None:
    pass


def _grads(trainer: Trainer, micro, objective: str = "lm") -> dict[str, torch.Tensor]:
    for p in trainer.model.parameters():
        p.grad = None
    st = trainer.config.stages[0]
    st.grad_accum, st.objective = len(micro), objective
    trainer._gradients(st, micro, trainer.train_step)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective, tasks", [("lm", ("caption", "color", "count")), ("contrastive", ("caption",))])
def test_two_micro_batches_give_the_gradients_of_one_batch(tmp_path, objective, tasks):
    """grad_accum: the same 8 samples as one micro-batch and as two of 4 give the same gradients:
    the loss is a mean over the step's target tokens, not a mean of the micro-batches' means.
    (Contrastive: the same gradients when each half is its own batch of negatives, summed.)"""
    trainer = Trainer(validate(from_dict(tiny_dict())), tmp_path / "run", log=quiet)
    world = World(image_size=32, seed=0)
    samples = [world.sample(tasks[i % len(tasks)], "train", i) for i in range(8)]
    halves = [make_batch(trainer.model, trainer.tokenizer, samples[:4]),
              make_batch(trainer.model, trainer.tokenizer, samples[4:])]
    if objective == "lm":
        lengths = [int((b.labels[:, 1:] != -100).sum()) for b in halves]
        assert lengths[0] != lengths[1]  # else a mean of means would be right by chance
        whole = _grads(trainer, [make_batch(trainer.model, trainer.tokenizer, samples)])
    else:  # negatives are per micro-batch: the reference is each half's mean loss, weighted by its size
        whole = {}
        for half in halves:
            for name, g in _grads(trainer, [half], objective).items():
                whole[name] = whole.get(name, 0) + g * 0.5
    split = _grads(trainer, halves, objective)
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_gradient_from_a_finite_loss_is_not_applied(tmp_path):
    """A gradient poisoned in backward (the loss stays finite) skips the step, is counted, and the
    learning-rate schedule still advances: it stays a function of the step."""
    data = tiny_dict(stages=[stage("s", steps=5, warmup_steps=2)],
                     train={"checkpoint_every": 1, "keep_checkpoints": 10})
    trainer = Trainer(validate(from_dict(data)), tmp_path / "run", log=quiet)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    trainer.model.connector.linear_1.weight.register_hook(poison)
    progress = trainer.run()
    rows = read_metrics(tmp_path / "run")
    assert [r["loss"] is None for r in rows] == [False, False, True, False, False]
    assert progress.skipped == {"nonfinite_step": 1}
    ck = [weights(p) for p in checkpoints(tmp_path / "run")]
    assert same_tensors(ck[2], ck[1]) and not same_tensors(ck[3], ck[2])
    assert all(math.isfinite(float(t.abs().max())) for t in ck[-1].values())
    factor = lr_lambda(trainer.config.stages[0])
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * factor(k) for k in range(1, 6)])


@pytest.mark.parametrize("off", [0, None])
def test_grad_clip_zero_or_null_turns_clipping_off(tmp_path, off):
    runs = {}
    for name, clip in (("off", off), ("huge", 1e9)):
        train(validate(from_dict(tiny_dict(stages=[stage("s", steps=3)], train={"grad_clip": clip}))),
              tmp_path / name, log=quiet)
        runs[name] = read_metrics(tmp_path / name)
    assert [r["loss"] for r in runs["off"]] == pytest.approx([r["loss"] for r in runs["huge"]], rel=1e-6)
    assert runs["off"][-1]["loss"] != pytest.approx(runs["off"][0]["loss"], rel=1e-3)  # it trains


def test_a_negative_grad_clip_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.grad_clip: -1\.0 is negative"):
        validate(from_dict(tiny_dict(train={"grad_clip": -1})))


def test_a_bfloat16_llm_trains_float32_master_weights(tmp_path):
    """model.llm.dtype bfloat16: the LLM trains in float32 (computed in bf16), so updates far below
    a bf16 weight's last bit still move it; a frozen bf16 encoder stays bf16."""
    model = {**tiny_dict()["model"]}
    model["llm"] = {**model["llm"], "dtype": "bfloat16"}
    model["encoder"] = {**model["encoder"], "dtype": "bfloat16"}
    data = tiny_dict(model=model, stages=[stage("s", steps=2, lr=1e-6, warmup_steps=1, train=["connector", "llm"])])
    trainer = Trainer(validate(from_dict(data)), tmp_path / "run", log=quiet)
    assert {p.dtype for p in trainer.model.llm.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.model.encoder.parameters()} == {torch.bfloat16}
    assert trainer.autocast
    before = {n: p.detach().clone() for n, p in trainer.model.llm.named_parameters()}
    trainer.run()
    moved = [n for n, p in trainer.model.llm.named_parameters() if not torch.equal(p, before[n])]
    rounded = [n for n, p in trainer.model.llm.named_parameters()
               if not torch.equal(p.to(torch.bfloat16), before[n].to(torch.bfloat16))]
    assert len(moved) > 10 and len(rounded) < len(moved)  # most updates are below bf16's resolution


def test_a_float16_part_that_trains_is_refused_naming_the_key(tmp_path):
    model = {**tiny_dict()["model"]}
    model["llm"] = {**model["llm"], "dtype": "float16"}
    frozen = tiny_dict(model=model, stages=[stage("s", steps=1, train=["connector"])])
    Trainer(validate(from_dict(frozen)), tmp_path / "ok", log=quiet)  # a frozen fp16 LLM is fine
    with pytest.raises(ConfigError, match=r"model\.llm\.dtype: float16 weights cannot train here"):
        Trainer(validate(from_dict(tiny_dict(model=model))), tmp_path / "bad", log=quiet)


def test_a_checkpoint_keeps_and_restores_the_gpu_random_state(tmp_path, monkeypatch):
    """Resume restores each process's CPU and CUDA random state (LoRA dropout on a GPU). No GPU here:
    torch.cuda's random-state functions are stood in for, the rest of the run is the real one."""
    gpu = {"state": [torch.tensor([7, 7], dtype=torch.uint8)], "restored": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in gpu["state"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: gpu.update(restored=states))
    data = validate(from_dict(tiny_dict(stages=[stage("s", steps=4)], train={"checkpoint_every": 2, "device": "cpu"})))
    train(data, tmp_path / "run", log=quiet)
    mid = tmp_path / "run" / "checkpoints" / "step-000002"
    saved = torch.load(mid / "optimizer.pt", weights_only=True)
    assert len(saved["rng"]) == 1 and torch.equal(saved["rng"][0]["cuda"][0], gpu["state"][0])
    gpu["state"] = [torch.tensor([1, 2], dtype=torch.uint8)]  # the GPU's state moves on; resume puts it back
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    Trainer(data, tmp_path / "run", resume=True, log=quiet).run()
    assert gpu["restored"] is not None and torch.equal(gpu["restored"][0], torch.tensor([7, 7], dtype=torch.uint8))


def test_activation_checkpointing_trains_as_without(tmp_path):
    runs = {}
    for flag in (False, True):
        data = tiny_dict(stages=[stage("s", steps=3, train=["connector", "llm"])],
                         train={"activation_checkpointing": flag})
        trainer = Trainer(validate(from_dict(data)), tmp_path / str(flag), log=quiet)
        assert trainer.model.llm.is_gradient_checkpointing == flag
        trainer.run()
        runs[flag] = read_metrics(tmp_path / str(flag))
    assert [r["loss"] for r in runs[True]] == pytest.approx([r["loss"] for r in runs[False]], rel=1e-6)
