"""train.report_to: metrics to TensorBoard and Weights & Biases besides metrics.jsonl."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from fusionlm.config import from_dict, validate
from fusionlm.errors import ConfigError
from fusionlm.train.loop import Trainer, train
from fusionlm.train.report import WANDB_ID, scalars
from tests.helpers_train import interrupt_after, read_metrics, stage, tiny_dict


def quiet(*_args, **_kw) -> None:
    pass


def recipe(report_to: list[str], steps: int = 4, **train_kw):
    train_kw = {"report_to": report_to, **train_kw}
    return from_dict(tiny_dict(stages=[stage("s", steps=steps, warmup_steps=1)], train=train_kw))


def tb_events(run: Path):
    """A run's TensorBoard events, read back as TensorBoard shows them (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return acc


def test_tensorboard_scalars_equal_the_metrics_lines(tmp_path):
    pytest.importorskip("tensorboard")
    train(recipe(["tensorboard"]), tmp_path / "run", log=quiet)
    rows = read_metrics(tmp_path / "run")
    acc = tb_events(tmp_path / "run")
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/samples_seen"} <= set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/tokens"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in rows] == [1, 2, 3, 4]
        key = tag.removeprefix("train/")
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 in events


def test_tensorboard_resume_continues_the_curve(tmp_path, monkeypatch):
    """Steps logged after the last checkpoint and before the kill are hidden; the curve reads as one run."""
    pytest.importorskip("tensorboard")
    config = recipe(["tensorboard"], steps=6, checkpoint_every=2)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "run", log=quiet)
    train(recipe(["tensorboard"], steps=6, checkpoint_every=2), tmp_path / "run", resume=True, log=quiet)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 7))
    events = tb_events(tmp_path / "run").Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 7))  # step 3, logged twice, appears once
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


class FakeWandb(types.ModuleType):
    """Records what the trainer asks of ``wandb``."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logs: list[tuple[dict, int]] = []
        self.finishes: list[dict] = []

    def init(self, **kw):
        self.inits.append(kw)
        return types.SimpleNamespace(id=kw.get("id"))

    def log(self, data: dict, step: int) -> None:
        self.logs.append((dict(data), step))

    def finish(self, **kw) -> None:
        self.finishes.append(kw)


def test_wandb_logs_every_line_and_resume_keeps_the_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    config = recipe(["wandb"], steps=4, checkpoint_every=2, run_name="tiny")
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(config, run, log=quiet)
    first = fake.inits[0]
    assert first["resume"] == "allow" and first["name"] == "tiny" and Path(first["dir"]) == run
    assert first["config"]["train"]["report_to"] == ["wandb"] and first["config"]["stages"][0]["steps"] == 4
    assert first["id"] == (run / WANDB_ID).read_text().strip()
    assert fake.finishes == [{"exit_code": 1}]  # interrupted: closed, marked failed
    assert [step for _, step in fake.logs] == [1, 2, 3]

    fake.logs.clear()
    train(recipe(["wandb"], steps=4, checkpoint_every=2, run_name="tiny"), run, resume=True, log=quiet)
    assert len(fake.inits) == 2
    assert fake.inits[1]["id"] == first["id"] and fake.inits[1]["resume"] == "allow"
    assert fake.finishes[-1] == {"exit_code": 0}
    rows = read_metrics(run)
    assert [step for _, step in fake.logs] == [3, 4]  # from the step-2 checkpoint on
    assert [data for data, _ in fake.logs] == [scalars(r) for r in rows[2:]]
    assert fake.logs[0][0]["train/loss"] == rows[2]["loss"] and "train/stage_name" not in fake.logs[0][0]

    train(recipe(["wandb"], steps=2), tmp_path / "other", log=quiet)  # a new run directory: a new W&B run
    assert fake.inits[2]["id"] != first["id"] and fake.inits[2]["name"] == "other"


def test_unknown_backend_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.report_to: 'mlflow' is not one of tensorboard, wandb"):
        validate(recipe(["tensorboard", "mlflow"]))
    with pytest.raises(ConfigError, match=r"train\.report_to: expected a list"):
        from_dict(tiny_dict(train={"report_to": "wandb"}))


def test_missing_wandb_fails_before_any_step(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    steps = []
    monkeypatch.setattr(Trainer, "_step", lambda *a, **k: steps.append(1))
    with pytest.raises(ConfigError, match=r"train\.report_to: wandb .*pip install wandb"):
        train(recipe(["wandb"]), tmp_path / "run", log=quiet)
    assert steps == [] and not (tmp_path / "run" / "metrics.jsonl").exists()
