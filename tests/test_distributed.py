"""Data parallelism: two CPU processes (gloo) train exactly as one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fusionlm.config import from_dict, validate
from fusionlm.errors import ConfigError
from fusionlm.llm import decoder_layers
from torch.distributed.tensor import DTensor
from fusionlm.train.loop import Trainer, train
from helpers_train import read_metrics, stage, tiny_dict


def recipe(batch: int = 8):
    data = tiny_dict()
    mixture = {"color": 1, "price": 1, "caption": 1}  # both stages: the same tasks, so the same tokenizer
    data["stages"] = [stage("s0", steps=4, batch_size=batch, mixture=mixture),
                      stage("s1", steps=3, batch_size=batch, grad_accum=2, train=["connector", "llm"], mixture=mixture)]
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: dict, out: str, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(validate(from_dict(json.loads(json.dumps(data)))), out, resume=resume, log=lambda *_: None)
    group, ok = trainer.group, False
    try:
        if data["train"].get("parallel") == "fsdp":  # each process holds half of every decoder layer
            for layer in decoder_layers(trainer.model.llm):
                for p in layer.parameters():
                    assert isinstance(p, DTensor) and p.to_local().numel() * world == p.numel(), p.shape
        trainer.run()
        ok = True
    finally:
        del trainer  # as fusionlm.train.loop.train leaves the group
        group.close(ok=ok)


def run_parallel(data: dict, out, world: int = 2, resume: bool = False) -> None:
    mp.spawn(_worker, args=(world, _free_port(), data, str(out), resume), nprocs=world, join=True)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "ddp unpacked"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, parallel):
    """``ddp unpacked``: one sample per row, so the grad_accum stage's micro-batches are grouped by length."""
    data = recipe()
    data["train"]["parallel"] = parallel.split()[0]
    if parallel.endswith("unpacked"):
        data["data"]["pack"] = False
    train(validate(from_dict(data)), tmp_path / "one", log=lambda *_: None)
    run_parallel(data, tmp_path / "two")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 7
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert (b["tokens"], b["samples_trained"], b["samples_seen"]) == (a["tokens"], a["samples_trained"],
                                                                           a["samples_seen"])
    # only rank 0 wrote: one metrics file, one set of checkpoints, loadable by a single process
    ckpt = sorted((tmp_path / "two" / "checkpoints").iterdir())[-1]
    from fusionlm.checkpoint import load_model

    from conftest import make_batch
    from fusionlm.data.world import World

    two_model, tokenizer, _ = load_model(ckpt)
    one_model, _, _ = load_model(sorted((tmp_path / "one" / "checkpoints").iterdir())[-1])
    world = World(image_size=32, seed=0)
    batch = make_batch(one_model, tokenizer, [world.sample(t, "val", 0) for t in ("color", "price", "caption")])
    with torch.no_grad():  # the same model: weights Adam moved on float noise (e.g. key biases) aside
        a, b = (m(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).logits
                for m in (one_model, two_model))
    assert (a - b).abs().max() < 1e-3


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    data = recipe()
    data["train"]["checkpoint_every"] = 2
    train(validate(from_dict(data)), tmp_path / "ref", log=lambda *_: None)
    data_short = json.loads(json.dumps(data))
    data_short["stages"] = data_short["stages"][:1]
    data_short["stages"][0]["steps"] = 4
    run_parallel(data_short, tmp_path / "run")  # stage 0 on two processes
    train(validate(from_dict(data)), tmp_path / "run", resume=True, log=lambda *_: None)  # the rest on one
    ref, run = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in run] == list(range(1, 8))
    for a, b in zip(ref, run):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)


def _resume_from(run, step: int, dest, world: int, data: dict) -> None:
    """Copy ``run`` without its checkpoints after ``step`` to ``dest`` and finish it on ``world`` processes."""
    shutil.copytree(run, dest)
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    if world == 1:
        train(validate(from_dict(json.loads(json.dumps(data)))), dest, resume=True, log=lambda *_: None)
    else:
        run_parallel(data, dest, world=world, resume=True)


def test_fsdp_checkpoints_resume_on_another_number_of_processes(tmp_path):
    """fsdp: a checkpoint taken mid-stage (optimizer state of sharded layers included) is whole, so
    2 processes resume a 1-process run and 1 process a 2-process run, each as if uninterrupted."""
    data = recipe()
    data["train"].update(parallel="fsdp", checkpoint_every=2, keep_checkpoints=10)
    train(validate(from_dict(data)), tmp_path / "one", log=lambda *_: None)
    run_parallel(data, tmp_path / "two")
    ref = read_metrics(tmp_path / "one")
    for src, world in (("two", 1), ("one", 2)):
        dest = tmp_path / f"{src}-on-{world}"
        _resume_from(tmp_path / src, 6, dest, world, data)  # step 6: stage 1, the LLM training, sharded
        run = read_metrics(dest)
        assert [r["step"] for r in run] == list(range(1, 8))
        assert run[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-5, abs=1e-6), src
        final = sorted((dest / "checkpoints").iterdir())[-1]
        a, b = load_file(str(final / "model.safetensors")), load_file(str(sorted(
            (tmp_path / "one" / "checkpoints").iterdir())[-1] / "model.safetensors"))
        assert a.keys() == b.keys()
        # Adam's step is ~lr on any gradient, float noise included (e.g. key biases): weights agree
        # to a fraction of one step's size (a lost optimizer state would move them by whole steps)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def test_checkpoints_written_as_shards_resume_on_any_number_of_processes(tmp_path):
    """train.checkpoint_format: sharded: each fsdp process writes its own shards of the weights and
    of Adam's state (nothing gathered on rank 0); a checkpoint taken mid-stage resumes on 2 processes
    and on 1 (the shards re-split) as if uninterrupted, and ``load_model`` reads the model whole."""
    from fusionlm.checkpoint import load_model

    data = recipe()
    data["train"].update(parallel="fsdp", checkpoint_every=2, keep_checkpoints=10, checkpoint_format="sharded")
    run_parallel(data, tmp_path / "two")
    ckpt = tmp_path / "two" / "checkpoints" / "step-000006"  # stage 1, mid-stage: Adam's state matters
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()
    ref = read_metrics(tmp_path / "two")
    whole = load_model(tmp_path / "two")[0].state_dict()
    for world in (2, 1):
        dest = tmp_path / f"on-{world}"
        _resume_from(tmp_path / "two", 6, dest, world, data)
        run = read_metrics(dest)
        assert [r["step"] for r in run] == list(range(1, 8))
        assert run[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-5, abs=1e-6)
        resumed = load_model(dest)[0].state_dict()
        assert resumed.keys() == whole.keys()
        # a lost Adam state would move the weights by about the learning rate (3e-3) in step 7
        assert max(float((resumed[k] - whole[k]).abs().max()) for k in whole) < 1e-4, world


def test_a_batch_that_does_not_split_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    data = recipe(batch=7)
    Trainer(validate(from_dict(data)), tmp_path / "ok", log=lambda *_: None)  # one process: any batch
    from fusionlm.train import loop

    class Three(loop.Group):
        def __init__(self, train):
            self.world, self.rank, self.main, self.sharded, self.device = 3, 0, True, False, torch.device("cpu")

        def barrier(self):
            pass  # no process group here: the refusal comes first

    monkeypatch.setattr(loop, "Group", Three)
    with pytest.raises(ConfigError, match=r"stages\.0\.batch_size: 7 does not split evenly over 3 processes"):
        Trainer(validate(from_dict(data)), tmp_path / "bad", log=lambda *_: None)


def test_lora_stages_are_refused_with_fsdp(tmp_path, monkeypatch):
    """peft would wrap layers FSDP has already sharded: refused before step 0, naming the stage."""
    data = recipe()
    data["train"]["parallel"] = "fsdp"
    data["stages"][1].update(train=["connector"], lora={"parts": ["llm"], "r": 4})
    from fusionlm.train import loop

    class Two(loop.Group):
        def __init__(self, train):
            self.world, self.rank, self.main, self.sharded = 2, 0, True, train.parallel == "fsdp"
            self.device = torch.device("cpu")

        def shard(self, root, layers, *, bf16):
            pass  # no process group here: the refusal comes first

        def barrier(self):
            pass

    monkeypatch.setattr(loop, "Group", Two)
    with pytest.raises(ConfigError, match=r"stages\.1\.lora: LoRA stages do not run with train\.parallel fsdp yet"):
        Trainer(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None)
    data["train"]["parallel"] = "ddp"  # the same stages with ddp are fine
    Trainer(validate(from_dict(data)), tmp_path / "ok", log=lambda *_: None)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_contrastive_stage_is_the_same_on_two_processes(tmp_path, parallel):
    """Negatives are gathered over processes: 1 and 2 processes give the same contrastive losses
    (with local negatives only, 2 processes scored ~ln 2 lower), and the LM stage after it too."""
    data = recipe()
    data["train"]["parallel"] = parallel
    data["stages"] = [stage("align", objective="contrastive", steps=3, batch_size=8, mixture={"caption": 1},
                            train=["encoder", "connector"]),
                      stage("lm", steps=2, batch_size=8, mixture={"caption": 1}, train=["connector", "llm"])]
    train(validate(from_dict(data)), tmp_path / "one", log=lambda *_: None)
    run_parallel(data, tmp_path / "two")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["stage"] for r in two] == [0, 0, 0, 1, 1]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])


def test_each_process_is_placed_on_its_own_device(monkeypatch):
    """torchrun's variables place process r of a node on cuda:LOCAL_RANK, in one process group
    serving CPU tensors over gloo and CUDA tensors over NCCL; on CPUs everything is gloo."""
    from fusionlm.train.distributed import plan

    assert plan({}, "cpu") == plan({}, "auto") == \
        type(plan({}, "cpu"))(1, 0, 0, torch.device("cpu"), None) if not torch.cuda.is_available() else True
    cpu = plan({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, "cpu")
    assert (cpu.world, cpu.rank, cpu.local_rank, cpu.device, cpu.backend) == (4, 3, 1, torch.device("cpu"), "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for rank, local in ((0, 0), (1, 1), (2, 0), (3, 1)):  # two nodes of two GPUs
        env = {"WORLD_SIZE": "4", "RANK": str(rank), "LOCAL_RANK": str(local)}
        for device in ("auto", "cuda"):
            p = plan(env, device)
            assert (p.rank, p.device, p.backend) == (rank, torch.device("cuda", local), "cpu:gloo,cuda:nccl")
        assert plan(env, "cuda", "gloo").backend == "gloo"
    assert plan({}, "cuda").device == torch.device("cuda", 0)
    assert plan({}, "cuda:1").device == torch.device("cuda", 1)  # one process may pick its GPU
    with pytest.raises(ConfigError, match="LOCAL_RANK 2: this machine has 2 GPU"):
        plan({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2"}, "cuda")
    with pytest.raises(ConfigError, match=r"train\.device: 'cuda:1' puts every process on one GPU"):
        plan({"WORLD_SIZE": "2", "RANK": "0"}, "cuda:1")
    with pytest.raises(ConfigError, match=r"train\.backend: nccl needs CUDA devices"):
        plan({"WORLD_SIZE": "2", "RANK": "0"}, "cpu", "nccl")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_process_without_samples_joins_the_others(tmp_path, parallel):
    """A 36-token context skips the long caption samples: with one sample per process, some steps
    leave one process (or both) with nothing to train on. The run neither hangs nor changes: the
    same losses (None where no process had a sample) and counts as one process."""
    data = recipe(batch=2)
    data["train"]["parallel"] = parallel
    data["model"]["llm"]["max_length"] = 36
    data["stages"] = [stage("s", steps=8, batch_size=2, mixture={"color": 1, "caption": 1})]
    train(validate(from_dict(data)), tmp_path / "one", log=lambda *_: None)
    run_parallel(data, tmp_path / "two")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    trained = [r["samples_trained"] for r in one]
    assert trained[0] == 0 and any(b - a == 1 for a, b in zip(trained, trained[1:]))  # empty and half steps
    for a, b in zip(one, two):
        assert (a["loss"] is None) == (b["loss"] is None)
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert (a["samples_trained"], a["skipped"]) == (b["samples_trained"], b["skipped"])


def _main_first_worker(rank: int, world: int, port: int, out: str) -> None:
    import time
    from types import SimpleNamespace

    from fusionlm.train.distributed import Group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    group = Group(SimpleNamespace(device="cpu", backend="auto", parallel="ddp", timeout_s=60))
    try:
        with group.main_first():
            if rank == 0:
                time.sleep(0.5)  # a download: the others must not start theirs before it ends
            with open(out, "a") as fh:
                fh.write(f"{rank}\n")
    finally:
        group.close(ok=True)


def test_rank_0_runs_the_hub_download_block_before_the_others(tmp_path):
    """The trainer builds the model inside ``main_first``: rank 0 fills the hub cache, then the rest read it."""
    out = tmp_path / "order.txt"
    mp.spawn(_main_first_worker, args=(3, _free_port(), str(out)), nprocs=3, join=True)
    lines = out.read_text().split()
    assert lines[0] == "0" and sorted(lines[1:]) == ["1", "2"]
