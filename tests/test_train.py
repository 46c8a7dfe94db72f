"""The training loop on tiny models: metrics, staged freezing, exact resume, atomic checkpoints,
broken data and non-finite losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fusionlm.checkpoint import list_checkpoints, load_model, resolve_checkpoint
from fusionlm.cli import main
from fusionlm.config import from_dict, validate
from fusionlm.llm import decoder_layers
from fusionlm.data.sources.formats import read_llava_json
from fusionlm.errors import CheckpointError, ConfigError
from fusionlm.model import FusionLM
from fusionlm.train.compiled import COMPILE_FROM, can_compile, compiles
from fusionlm.train.loop import Trainer, train
from tests.helpers_train import (
    checkpoints, interrupt_after as _interrupt_after, read_metrics, same_tensors, stage, tiny_dict, weights, write_recipe,
)


def quiet(*_args, **_kw) -> None:
    pass


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- metrics and loss


def test_metrics_one_line_per_step_and_loss_falls(tmp_path):
    config = from_dict(tiny_dict(stages=[stage("s", steps=30, warmup_steps=3)]))
    progress = train(config, tmp_path / "run", log=quiet)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert r["stage"] == 0 and r["stage_name"] == "s"
        assert isinstance(r["loss"], float) and r["tokens"] > 0
        assert r["samples_trained"] + sum(r["skipped"].values()) == r["samples_seen"]
    assert rows[-1]["samples_seen"] == 30 * 4 == progress.samples_seen
    assert progress.step == 30 and progress.tokens == sum(r["tokens"] for r in rows)
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000030"]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"  # the loss plot, at the end


def test_grad_accum_logs_one_line_per_optimizer_step(tmp_path):
    config = from_dict(tiny_dict(stages=[stage("s", steps=3, grad_accum=2, batch_size=2)]))
    train(config, tmp_path / "run", log=quiet)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["samples_seen"] for r in rows] == [4, 8, 12]


# ----------------------------------------------------------------------------- stages and freezing


def test_each_stage_trains_only_its_parts(tmp_path):
    config = from_dict(tiny_dict(stages=[stage("align", train=["connector"], steps=3),
                                         stage("sft", train=["llm"], steps=3)]))
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    rows = read_metrics(tmp_path / "run")
    assert [(r["step"], r["stage"], r["stage_step"]) for r in rows] == [
        (1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 1, 1), (5, 1, 2), (6, 1, 3)]
    after0, after1 = (weights(p) for p in checkpoints(tmp_path / "run"))
    assert same_tensors(after0, initial, "encoder.") and same_tensors(after0, initial, "llm.")
    assert not same_tensors(after0, initial, "connector.")
    assert same_tensors(after1, after0, "encoder.") and same_tensors(after1, after0, "connector.")
    assert not same_tensors(after1, after0, "llm.")
    # no optimizer state for frozen parameters: stage 1's optimizer holds the LLM's tensors only
    state = torch.load(checkpoints(tmp_path / "run")[-1] / "optimizer.pt", weights_only=True)
    n_llm = sum(1 for _ in trainer.model.llm.parameters())
    assert len(state["optimizer"]["state"]) == n_llm


def test_a_weight_no_forward_uses_still_gets_its_zero_gradient(tmp_path):
    """Text-only batches never run the encoder: one process gives its weights the zero gradient N
    processes give them (``step.zero_unused``), so they get Adam state and weight decay alike."""
    config = from_dict(tiny_dict(stages=[stage("text", train=["all"], steps=2, mixture={"text_only": 1},
                                               weight_decay=0.5)]))
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if k.startswith("encoder.")}
    trainer.run()
    after = {k: v for k, v in trainer.model.state_dict().items() if k in initial}
    ratios = {float((after[k][initial[k] != 0] / initial[k][initial[k] != 0]).mean()) for k in initial
              if initial[k].count_nonzero()}
    assert max(ratios) < 1 and max(ratios) - min(ratios) < 1e-6  # decay alone, the same factor on every weight
    state = torch.load(checkpoints(tmp_path / "run")[-1] / "optimizer.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == sum(1 for _ in trainer.model.parameters())


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stages, every, stop", [
    ([stage("s", steps=10, warmup_steps=3)], 4, 6),  # resumes from step 4, in the only stage
    ([stage("a", steps=5, train=["connector"]), stage("b", steps=5, warmup_steps=1)], 3, 8),  # stage 1, from step 6
    ([stage("a", steps=5, train=["connector"]), stage("b", steps=5, warmup_steps=1)], 0, 7),  # from stage 0's end
])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys, monkeypatch, stages, every, stop):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dict(stages=stages, train={"checkpoint_every": every}))
    total = sum(s["steps"] for s in stages)
    assert run_cli(capsys, "train", recipe, "--out", tmp_path / "a")[0] == 0

    with monkeypatch.context() as m:
        _interrupt_after(m, stop)
        rc, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "b")
    assert rc == 130 and "interrupted" in err
    assert len(read_metrics(tmp_path / "b")) == stop
    rc, out, _ = run_cli(capsys, "train", recipe, "--out", tmp_path / "b", "--resume")
    assert rc == 0 and "resuming from" in out

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, total + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
        for key in ("stage", "tokens", "samples_seen", "samples_trained", "skipped"):
            assert ra[key] == rb[key], key
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
    wa, wb = weights(checkpoints(tmp_path / "a")[-1]), weights(checkpoints(tmp_path / "b")[-1])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    state_a = json.loads((checkpoints(tmp_path / "a")[-1] / "trainer.json").read_text())
    state_b = json.loads((checkpoints(tmp_path / "b")[-1] / "trainer.json").read_text())
    assert state_a == state_b


def test_a_stage_end_checkpoint_resumes_at_the_next_stage(tmp_path, capsys, monkeypatch):
    """Killed right after stage 0's last checkpoint: the resume starts stage 1, without re-entering
    stage 0 (no second 'stage 0' line, no rewrite of its checkpoint)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dict(stages=[stage("a", steps=3, train=["connector"]),
                                                                 stage("b", steps=2)]))
    import fusionlm.train.loop as loop_mod

    original = loop_mod.Trainer._run_stage

    def stop_after_stage_0(self, index):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index)

    with monkeypatch.context() as m:
        m.setattr(loop_mod.Trainer, "_run_stage", stop_after_stage_0)
        assert run_cli(capsys, "train", recipe, "--out", tmp_path / "run")[0] == 130
    (end0,) = checkpoints(tmp_path / "run")
    assert json.loads((end0 / "trainer.json").read_text())["stage"] == 1
    written = (end0 / "model.safetensors").stat().st_mtime_ns
    rc, out, _ = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--resume")
    assert rc == 0 and "stage 0 (a)" not in out and "stage 1 (b)" in out
    assert (end0 / "model.safetensors").stat().st_mtime_ns == written
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_training_leaves_the_callers_config_as_it_was(tmp_path):
    """Building the model resolves the vocabulary size and end token, and init_from swaps in the
    checkpoint's model: all in the trainer's own copy, never in the config it was handed."""
    data = tiny_dict(stages=[stage("s", steps=1)])
    config = from_dict(data)
    train(config, tmp_path / "first", log=quiet)
    assert config == from_dict(data)
    data["train"]["init_from"] = str(tmp_path / "first")
    data["model"]["llm"]["num_layers"] = 3  # replaced by the checkpoint's model
    config = from_dict(data)
    train(config, tmp_path / "second", log=quiet)
    assert config == from_dict(data)


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    config = from_dict(tiny_dict(stages=[stage("s", steps=2)]))
    lines: list[str] = []
    train(config, tmp_path / "run", resume=True, log=lambda s: lines.append(str(s)))
    assert any("starting afresh" in s for s in lines)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


# ----------------------------------------------------------------------------- checkpoints on disk


@pytest.fixture
def run_with_two_checkpoints(tmp_path) -> Path:
    config = from_dict(tiny_dict(stages=[stage("s", steps=6)], train={"checkpoint_every": 3}))
    train(config, tmp_path / "run", log=quiet)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003", "step-000006"]
    return tmp_path / "run"


def test_half_written_temporary_checkpoint_is_ignored(run_with_two_checkpoints, capsys):
    run = run_with_two_checkpoints
    tmp = run / "checkpoints" / ".step-000008.tmp-123"
    shutil.copytree(run / "checkpoints" / "step-000006", tmp)
    full = (tmp / "model.safetensors").read_bytes()
    (tmp / "model.safetensors").write_bytes(full[: len(full) // 2])
    (tmp / "trainer.json").unlink()
    (run / "checkpoints" / "step-000009").mkdir()  # an empty directory with a step name
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000006"
    model, _, _ = load_model(run)
    assert isinstance(model, FusionLM)
    # resume takes step 6 too, and finishes at once (the stage is complete)
    rc, out, err = run_cli(capsys, "train", run / "config.yaml", "--out", run, "--resume")
    assert rc == 0, err
    assert "resuming from" in out and "step-000006" in out
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))


def test_truncated_weights_are_refused_by_name(run_with_two_checkpoints, capsys):
    run = run_with_two_checkpoints
    file = run / "checkpoints" / "step-000006" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as info:
        load_model(run)
    assert str(file) in str(info.value)
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", "hi")
    assert rc == 2 and str(file) in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "train", run / "config.yaml", "--out", run, "--resume")
    assert rc == 2 and "model.safetensors" in err and "Traceback" not in err


def test_a_run_written_as_shards_loads_exports_and_names_a_damaged_shard(tmp_path, capsys):
    """train.checkpoint_format: sharded on one process: the checkpoints hold shards, no safetensors
    file; eval and export read them whole (export --format fusionlm writes the one-file checkpoint);
    a truncated shard is refused naming its folder, with no traceback."""
    run = tmp_path / "run"
    train(from_dict(tiny_dict(stages=[stage("s", steps=4)], train={"checkpoint_format": "sharded",
                                                                   "checkpoint_every": 2})), run, log=quiet)
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000004"]
    last = list_checkpoints(run)[-1]
    assert (last / "sharded" / ".metadata").is_file() and not (last / "model.safetensors").exists()
    model, _, _ = load_model(run)
    assert run_cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "whole", "--format", "fusionlm")[0] == 0
    assert same_tensors(weights(tmp_path / "whole"), model.state_dict())
    shard = last / "sharded" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot load these shards into the model"):
        load_model(run)
    rc, _, err = run_cli(capsys, "train", run / "config.yaml", "--out", run, "--resume")
    assert rc == 2 and str(last / "sharded") in err and "Traceback" not in err


# ----------------------------------------------------------------------------- user data with problems


@pytest.fixture
def llava_dir(tmp_path, capsys) -> Path:
    out = tmp_path / "data"
    rc = main(["data", "--out", str(out), "--n", "3", "--tasks", "color", "shape", "--image-size", "32"])
    capsys.readouterr()
    assert rc == 0
    return out


def _corrupt(images: list[str]) -> list[str]:
    """Break three image files three ways; returns their paths."""
    zero, truncated, html = images[:3]
    Path(zero).write_bytes(b"")
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    Path(html).write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    return [zero, truncated, html]


def _file_recipe(tmp_path, json_path: Path, **stage_kw) -> Path:
    data = tiny_dict(data={"source": str(json_path)},
                     stages=[stage("s", mixture={"color": 1, "shape": 1}, **stage_kw)])
    return write_recipe(tmp_path / "file.yaml", data)


def test_bad_images_are_skipped_counted_and_named(tmp_path, capsys, llava_dir):
    json_path = llava_dir / "data.json"
    samples = read_llava_json(json_path)
    bad = _corrupt([s.images[0] for s in samples if s.task == "color"])
    recipe = _file_recipe(tmp_path, json_path, steps=15)  # 60 samples seen: past the 50-sample floor
    rc, out, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--set", "data.max_bad_fraction=0.8")
    assert rc == 0, err
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 15
    last = rows[-1]
    assert last["skipped"].get("bad_image", 0) > 0
    assert set(last["skipped"]) == {"bad_image"}
    for r in rows:
        assert r["samples_trained"] + sum(r["skipped"].values()) == r["samples_seen"]
    assert last["samples_seen"] == 60
    for path in bad:  # each broken file is named in the log with its reason
        assert Path(path).name in out
    assert "empty file" in out and "not a recognised image" in out
    assert "skipped" in out.splitlines()[-1]


def test_too_many_bad_images_stop_the_run(tmp_path, capsys, llava_dir):
    json_path = llava_dir / "data.json"
    _corrupt([s.images[0] for s in read_llava_json(json_path) if s.task == "color"])
    recipe = _file_recipe(tmp_path, json_path, steps=15)
    rc, out, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--set", "data.max_bad_fraction=0.1")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "training stopped" in err and "max_bad_fraction=0.1" in err and "bad_image" in err
    assert len(read_metrics(tmp_path / "run")) < 15


def _edit_json(path: Path, fn) -> None:
    records = json.loads(path.read_text())
    fn(records)
    path.write_text(json.dumps(records))


def test_placeholder_mismatch_fails_before_step_0(tmp_path, capsys, llava_dir):
    json_path = llava_dir / "data.json"

    def two_markers(records):
        records[1]["conversations"][0]["value"] = "<image>\n<image>\nWhat colour is the shape?"

    _edit_json(json_path, two_markers)
    sid = json.loads(json_path.read_text())[1]["id"]
    rc, _, err = run_cli(capsys, "train", _file_recipe(tmp_path, json_path), "--out", tmp_path / "run")
    assert rc == 2
    assert sid in err and "2 <image>" in err and "1 image" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("escape", ["../../etc/passwd", "/etc/passwd"])
def test_image_path_escaping_the_data_root_is_refused(tmp_path, capsys, llava_dir, escape):
    json_path = llava_dir / "data.json"

    def escape_path(records):
        records[0]["image"] = escape

    _edit_json(json_path, escape_path)
    rc, _, err = run_cli(capsys, "train", _file_recipe(tmp_path, json_path), "--out", tmp_path / "run")
    assert rc == 2
    assert "escapes the data root" in err and escape in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_symlink_leaving_the_data_root_is_refused(tmp_path, capsys, llava_dir):
    outside = tmp_path / "outside.png"
    shutil.copy(next((llava_dir / "images").glob("*.png")), outside)
    (llava_dir / "images" / "link.png").symlink_to(outside)
    json_path = llava_dir / "data.json"

    def link(records):
        records[0]["image"] = "images/link.png"

    _edit_json(json_path, link)
    rc, _, err = run_cli(capsys, "train", _file_recipe(tmp_path, json_path), "--out", tmp_path / "run")
    assert rc == 2 and "escapes the data root" in err


# ----------------------------------------------------------------------------- non-finite loss


def _poison_loss(monkeypatch, bad_calls: set[int] | None, value: float = float("nan")) -> None:
    """Make the training forward's loss ``value`` on the given call numbers (1-based; None = all)."""
    original = FusionLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kw):
        out = original(self, *args, **kw)
        if out.loss is not None:
            calls["n"] += 1
            if bad_calls is None or calls["n"] in bad_calls:
                out.loss = out.loss * value
        return out

    monkeypatch.setattr(FusionLM, "forward", forward)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_one_non_finite_loss_skips_that_step_only(tmp_path, monkeypatch, value):
    config = from_dict(tiny_dict(stages=[stage("s", steps=5)], train={"checkpoint_every": 1, "keep_checkpoints": 10}))
    _poison_loss(monkeypatch, {3}, value)
    lines: list[str] = []
    progress = train(config, tmp_path / "run", log=lambda s: lines.append(str(s)))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["loss"] is None and all(r["loss"] is not None for i, r in enumerate(rows) if i != 2)
    assert rows[2]["skipped"] == {"nonfinite_step": 1}
    assert progress.skipped == {"nonfinite_step": 1} and progress.bad_steps == 0
    assert any("step 3: non-finite loss" in s for s in lines)
    ck = {p.name: weights(p) for p in checkpoints(tmp_path / "run")}
    assert same_tensors(ck["step-000003"], ck["step-000002"])  # no update on the bad step
    assert not same_tensors(ck["step-000004"], ck["step-000003"])  # training goes on


def test_non_finite_micro_batch_keeps_the_data_position(tmp_path, monkeypatch):
    """A bad first micro-batch still draws the step's other micro-batches: every step consumes
    grad_accum batches, so later steps see the data a resumed run would."""
    config = from_dict(tiny_dict(stages=[stage("s", steps=4, grad_accum=2)]))
    _poison_loss(monkeypatch, {3})  # the first micro-batch of step 2
    train(config, tmp_path / "run", log=lambda *_: None)
    rows = read_metrics(tmp_path / "run")
    assert [r["samples_seen"] for r in rows] == [8, 16, 24, 32]
    assert rows[1]["loss"] is None and all(r["loss"] is not None for i, r in enumerate(rows) if i != 1)


def test_non_finite_every_step_stops_after_max_bad_steps(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dict(stages=[stage("s", steps=6)]))
    _poison_loss(monkeypatch, None)
    rc, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--set", "train.max_bad_steps=3")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "3 non-finite steps in a row" in err and "step 3" in err
    assert len(read_metrics(tmp_path / "run")) == 2
    assert list_checkpoints(tmp_path / "run") == []


def test_a_stage_compiles_by_default_only_when_it_is_long_enough():
    """train.compile: an explicit value is obeyed; null compiles from COMPILE_FROM micro-batches on,
    where inductor can build kernels."""
    cpu = torch.device("cpu")
    assert compiles(True, 1, cpu) and not compiles(False, 10 * COMPILE_FROM, cpu)
    assert not compiles(None, COMPILE_FROM - 1, cpu)
    assert compiles(None, COMPILE_FROM, cpu) == can_compile(cpu)


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_layers_train_as_eager(tmp_path, monkeypatch):
    """train.compile: the same losses as eager, and checkpoints with the same parameter names; under
    the default (null) each stage decides: here the short stage runs eager, the long one compiled."""
    from fusionlm.train import compiled, loop

    monkeypatch.setattr(compiled, "COMPILE_FROM", 3)
    stages = [stage("short", steps=2, train=["connector", "llm"]), stage("long", steps=3, train=["connector", "llm"])]
    eager, auto = (tiny_dict(stages=stages, train={"compile": flag}) for flag in (False, None))
    train(from_dict(eager), tmp_path / "eager", log=quiet)
    decided = []
    monkeypatch.setattr(loop, "compile_layers", lambda layers, on: (decided.append(on), compiled.compile_layers(layers, on)))
    trainer = Trainer(from_dict(auto), tmp_path / "compiled", log=quiet)
    trainer.run()
    assert decided == [False, True]
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(trainer.model.llm))
    a, b = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    wa, wb = weights(checkpoints(tmp_path / "eager")[-1]), weights(checkpoints(tmp_path / "compiled")[-1])
    assert wa.keys() == wb.keys()


def test_each_stage_runs_on_its_own_threads_and_the_run_ends_on_the_runs(tmp_path, monkeypatch):
    """stages[i].threads: the stage's intra-op threads (0: train.threads, else torch's own);
    after the run the process is back on the run's."""
    stages = [stage("one", steps=2, threads=1), stage("default", steps=2), stage("three", steps=2, threads=3)]
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    train(from_dict(tiny_dict(stages=stages, train={"threads": 2})), tmp_path / "run", log=quiet)
    assert seen == [1, 2, 3, 2]
    seen.clear()
    before = torch.get_num_threads()
    train(from_dict(tiny_dict(stages=stages[:2])), tmp_path / "own", log=quiet)
    assert seen == [1, before, before]


def test_negative_stage_threads_are_refused_naming_the_stage():
    with pytest.raises(ConfigError, match=r"stages\.0\.threads: -1 is negative"):
        validate(from_dict(tiny_dict(stages=[stage("s", threads=-1)])))
