"""`kill -9` of real `fusionlm train` processes, at any moment, then `--resume`.

Each kill must lose at most the steps since the last complete checkpoint, and the resumed run must
match an uninterrupted one exactly: the same steps once each, losses, learning rates, counters,
optimizer state and final weights. Some kill points are too short to hit by timing (a checkpoint
being written, a half-written metrics line, the metrics file being rewritten on resume): there the
child, test-only code around the unchanged product, stops at that point and says so, and the test
kills it there.

Importing torch + fusionlm costs ~10 s of CPU per process on the shared test machine, so the
processes but the first are forked from one server that imported them once (``ZYGOTE``): each
is still a process of its own, killed by a real SIGKILL. The first is a plain `python -m
fusionlm.cli train`, killed by timing alone.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fusionlm.checkpoint import list_checkpoints
from fusionlm.cli import main
from fusionlm.data.sources.formats import read_llava_json
from tests.helpers_train import checkpoints, read_metrics, stage, tiny_dict, weights, write_recipe

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 14, 2

# A fork server: it imports torch and fusionlm once (~10 s of CPU on a shared machine), then forks
# one `fusionlm train` process per request. Each child is a process of its own, killed by a real
# SIGKILL; it may first install one stall point (HOOK, ARG): when it gets there it creates READY
# and sleeps until it is killed. Protocol: a JSON request per stdin line; the server answers the
# child's pid, then its exit code (negative: the signal) once it has ended.
ZYGOTE = r"""
import io, builtins, json, os, sys, time, traceback
from pathlib import Path

import torch
import fusionlm.checkpoint, fusionlm.train.loop
from fusionlm.cli import main


def stall(ready):
    ready.write_text(str(os.getpid()))
    time.sleep(300)
    os._exit(98)


def hook_checkpoint(arg, ready):  # inside save_model for checkpoint ARG: weights written, config not yet
    ck = fusionlm.checkpoint
    save_config = ck.save_config

    def stalling_save_config(config, path):
        if Path(path).parent.name.startswith("." + arg + ".tmp-"):
            stall(ready)
        return save_config(config, path)

    ck.save_config = stalling_save_config


def hook_torn_line(arg, ready):  # the metrics line of step ARG half written
    Trainer = fusionlm.train.loop.Trainer
    log_step = Trainer._log_step

    def torn_log_step(self, *args, **kw):
        if self.progress.step != int(arg):
            return log_step(self, *args, **kw)
        real = self.metrics_path
        one = self.metrics_path = real.with_name("one-line.jsonl")
        try:
            log_step(self, *args, **kw)
        finally:
            self.metrics_path = real
        line = one.read_text()
        one.unlink()
        with open(real, "a") as fh:
            fh.write(line[: len(line) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        stall(ready)

    Trainer._log_step = torn_log_step


def hook_metrics_rewrite(arg, ready):  # a write-mode open of metrics.jsonl*: half its data, then stall
    real_open = io.open

    class Stalling:
        def __init__(self, fh):
            self.fh = fh
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.fh.close()
        def __getattr__(self, name):
            return getattr(self.fh, name)
        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            os.fsync(self.fh.fileno())
            stall(ready)

    def stalling_open(file, mode="r", *args, **kw):
        fh = real_open(file, mode, *args, **kw)
        if isinstance(file, (str, os.PathLike)) and "w" in mode and \
                os.path.basename(os.fspath(file)).startswith("metrics.jsonl"):
            return Stalling(fh)
        return fh

    io.open = builtins.open = stalling_open


def hook_swap(arg, ready):  # checkpoint ARG replaced: the old one set aside, the new one not yet in place
    ck = fusionlm.checkpoint
    replace = ck.os.replace

    class Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            replace(src, dst)
            if Path(src).name == arg and ".old-" in Path(dst).name:
                stall(ready)

    ck.os = Os()


HOOKS = {"none": lambda arg, ready: None, "checkpoint": hook_checkpoint, "torn-line": hook_torn_line,
         "metrics-rewrite": hook_metrics_rewrite, "swap": hook_swap}


def child(req):
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    HOOKS[req["hook"]](req["arg"], Path(req["ready"]))
    rc = main(req["argv"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        os._exit(99)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Zygote:
    def __init__(self, tmp: Path):
        (tmp / "zygote.py").write_text(ZYGOTE)
        self.proc = subprocess.Popen([sys.executable, str(tmp / "zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=tmp, env=child_env(),
                                     start_new_session=True)
        self.replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.started = False

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line.strip())
        self.replies.put("")  # the server has ended

    def reply(self, timeout: float) -> str:
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the fork server did not answer in {timeout} s")
        if not line:
            pytest.fail(f"the fork server ended ({self.proc.wait()})")
        return line

    def fork(self, request: dict) -> int:
        if not self.started:
            assert self.reply(300) == "ready"
            self.started = True
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(self.reply(60))

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and any child it still has
        self.proc.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    server = Zygote(tmp_path_factory.mktemp("zygote"))
    yield server
    server.close()


class Child:
    """One `fusionlm train` process writing its output to a file: forked by ``zygote`` (with an
    optional stall point), or, with ``zygote=None``, a plain `python -m fusionlm.cli` process."""

    def __init__(self, zygote: Zygote | None, tmp: Path, name: str, recipe: Path, run: Path, *, resume: bool,
                 hook: str = "none", arg: str = ""):
        self.zygote, self.rc = zygote, None
        self.ready, self.log_path = tmp / f"{name}.ready", tmp / f"{name}.log"
        argv = ["train", str(recipe), "--out", str(run)] + (["--resume"] if resume else [])
        if zygote is None:
            assert hook == "none"
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "fusionlm.cli", *argv], stdout=log,
                                             stderr=subprocess.STDOUT, cwd=tmp, env=child_env())
            self.pid = self.proc.pid
        else:
            self.pid = zygote.fork({"hook": hook, "arg": arg, "ready": str(self.ready), "log": str(self.log_path),
                                    "argv": argv})

    @property
    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def exited(self) -> bool:
        if self.rc is None:
            if self.zygote is None:
                self.rc = self.proc.poll()
            elif not self.zygote.replies.empty():
                self.rc = int(self.zygote.reply(1))
        return self.rc is not None

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                pytest.fail(f"still running after {timeout} s:\n{self.output}")
            time.sleep(0.01)
        return self.rc

    def kill_when(self, condition, what: str, timeout: float = 300) -> None:
        """SIGKILL as soon as ``condition()`` holds (polled every 5 ms); the child must still be running."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.exited():
                pytest.fail(f"the child exited ({self.rc}) before {what}:\n{self.output}")
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                pytest.fail(f"no {what} after {timeout} s:\n{self.output}")
            time.sleep(0.005)
        os.kill(self.pid, signal.SIGKILL)
        assert self.wait(60) == -signal.SIGKILL, self.output

    def kill_when_stalled(self, what: str) -> None:
        self.kill_when(self.ready.exists, what)

    def finish(self) -> str:
        assert self.wait() == 0, self.output
        return self.output


def lines(run: Path) -> list[str]:
    """metrics.jsonl's complete lines (a torn last line, without its newline, is left out)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    return text.splitlines()[: text.count("\n")]


def last_step(run: Path) -> int:
    found = list_checkpoints(run)
    return int(found[-1].name.split("-")[1].split(".")[0]) if found else 0


def assert_resumed_from(out: str, run: Path, step: int) -> None:
    expected = f"resuming from {run / 'checkpoints' / f'step-{step:06d}'} (step {step})"
    assert expected in out, f"expected {expected!r} in:\n{out}"


def assert_same_run(ref: Path, run: Path, steps: int) -> None:
    """``run`` reads as ``ref``: every metrics line whole, steps 1..N once each, the same numbers,
    and the same final weights, optimizer and trainer state."""
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n"), "metrics.jsonl ends with a torn line"
    a, b = read_metrics(ref), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9), ra["step"]
        for key in ("stage", "stage_step", "tokens", "samples_seen", "samples_trained", "skipped"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    ca, cb = checkpoints(ref)[-1], checkpoints(run)[-1]
    assert ca.name == cb.name == f"step-{steps:06d}"
    wa, wb = weights(ca), weights(cb)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    assert json.loads((ca / "trainer.json").read_text()) == json.loads((cb / "trainer.json").read_text())
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True)["optimizer"] for c in (ca, cb))
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for name, t in oa["state"][k].items():
            torch.testing.assert_close(ob["state"][k][name], t, rtol=0, atol=1e-6, msg=f"{k}.{name}")


# ----------------------------------------------------------------------------- synthetic data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, zygote) -> tuple[Path, Path]:
    """(recipe, uninterrupted reference run), trained once in this process."""
    tmp = tmp_path_factory.mktemp("kill-ref")
    recipe = write_recipe(tmp / "r.yaml", tiny_dict(
        stages=[stage("s", steps=STEPS, warmup_steps=2)],
        train={"seed": 0, "eval_per_task": 3, "checkpoint_every": EVERY, "threads": 1}))
    assert main(["train", str(recipe), "--out", str(tmp / "ref")]) == 0
    return recipe, tmp / "ref"


def test_kill_9_anywhere_then_resume_matches_the_uninterrupted_run(synthetic, zygote, tmp_path):
    """Five processes on one run directory, four of them killed, each somewhere else."""
    recipe, ref = synthetic
    run = tmp_path / "run"

    # 1. a plain kill -9 by timing, a few steps in (whatever it was doing then)
    child = Child(None, tmp_path, "p1", recipe, run, resume=False)
    child.kill_when(lambda: len(lines(run)) >= 3, "3 metrics lines")
    done, kept = len(lines(run)), last_step(run)
    assert kept >= 2 and done - kept <= EVERY, (done, kept)  # lost: the steps since the last checkpoint
    assert kept < 8, f"killed too late for the rest of this test ({done} steps done)"

    # 2. killed while checkpoint step-8 is being written (its weights on disk, the rest not yet)
    child = Child(zygote, tmp_path, "p2", recipe, run, resume=True, hook="checkpoint", arg="step-000008")
    child.kill_when_stalled("checkpoint step-8 being written")
    assert_resumed_from(child.output, run, kept)
    tmp_dirs = list((run / "checkpoints").glob(".step-000008.tmp-*"))
    assert len(tmp_dirs) == 1 and (tmp_dirs[0] / "model.safetensors").is_file()
    assert not (tmp_dirs[0] / "trainer.json").exists()
    assert last_step(run) == 6  # the half-written step 8 is not a checkpoint
    assert [json.loads(s)["step"] for s in lines(run)] == list(range(1, 9))  # resumed lines not repeated

    # 3. killed with the metrics line of step 11 half written
    child = Child(zygote, tmp_path, "p3", recipe, run, resume=True, hook="torn-line", arg="11")
    child.kill_when_stalled("a torn metrics line")
    assert_resumed_from(child.output, run, 6)
    assert not list((run / "checkpoints").glob(".step-*.tmp-*"))  # the resume removed the half-written one
    text = (run / "metrics.jsonl").read_text()
    assert not text.endswith("\n") and text.count("\n") == 10, "the stall did not leave a torn line"
    assert last_step(run) == 10

    # 4. killed while the resumed run rewrites metrics.jsonl (dropping the lines after step 10)
    child = Child(zygote, tmp_path, "p4", recipe, run, resume=True, hook="metrics-rewrite")
    child.kill_when_stalled("metrics.jsonl being rewritten")
    assert_resumed_from(child.output, run, 10)
    after = (run / "metrics.jsonl").read_text()
    assert after.splitlines()[:10] == text.splitlines()[:10], "a kill mid-rewrite lost metrics lines"

    # 5. resumed to the end: the same run as the uninterrupted one
    out = Child(zygote, tmp_path, "p5", recipe, run, resume=True).finish()
    assert_resumed_from(out, run, 10)
    assert_same_run(ref, run, STEPS)


def test_kill_9_while_a_checkpoint_is_replaced_loses_neither(synthetic, zygote, tmp_path):
    """A run started afresh in the directory of a finished one replaces its checkpoints one by one.
    Killed between setting the old step-12 aside and renaming the new one in, the old one is still
    whole, and the next resume puts it back in its place."""
    recipe, ref = synthetic
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    child = Child(zygote, tmp_path, "p1", recipe, run, resume=False, hook="swap", arg="step-000012")
    child.kill_when_stalled("step-12 set aside, its replacement not yet in place")
    folder = run / "checkpoints"
    aside = list(folder.glob(".step-000012.old-*"))
    assert not (folder / "step-000012").exists() and len(aside) == 1
    assert (aside[0] / "model.safetensors").is_file() and (aside[0] / "trainer.json").is_file()
    out = Child(zygote, tmp_path, "p2", recipe, run, resume=True).finish()
    assert "nothing to resume" in out  # the latest complete checkpoint is the finished run's
    assert not list(folder.glob(".step-*"))
    back, original = weights(folder / "step-000012"), weights(ref / "checkpoints" / "step-000012")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)


# ----------------------------------------------------------------------------- bad images


@pytest.fixture
def bad_llava(tmp_path) -> Path:
    """A LLaVA-format data dir whose colour images are broken three ways; returns its data.json."""
    out = tmp_path / "data"
    assert main(["data", "--out", str(out), "--n", "3", "--tasks", "color", "shape", "--image-size", "32"]) == 0
    zero, truncated, html = [s.images[0] for s in read_llava_json(out / "data.json") if s.task == "color"][:3]
    Path(zero).write_bytes(b"")
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    Path(html).write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    return out / "data.json"


def test_bad_image_counts_add_up_across_a_kill(zygote, tmp_path, bad_llava):
    steps = 15  # 60 samples seen: past the 50-sample floor of max_bad_fraction
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dict(
        data={"source": str(bad_llava), "max_bad_fraction": 0.8},
        stages=[stage("s", mixture={"color": 1, "shape": 1}, steps=steps)],
        train={"seed": 0, "eval_per_task": 3, "checkpoint_every": 3, "threads": 1}))
    assert main(["train", str(recipe), "--out", str(tmp_path / "ref")]) == 0

    run = tmp_path / "run"
    child = Child(zygote, tmp_path, "bad", recipe, run, resume=False, hook="checkpoint", arg="step-000012")
    child.kill_when_stalled("checkpoint step-12 being written")
    assert last_step(run) == 9 and len(lines(run)) == 12
    out = Child(zygote, tmp_path, "bad-resume", recipe, run, resume=True).finish()
    assert_resumed_from(out, run, 9)
    assert_same_run(tmp_path / "ref", run, steps)

    rows = read_metrics(run)
    for r in rows:
        assert r["samples_trained"] + sum(r["skipped"].values()) == r["samples_seen"], r
    last = rows[-1]
    assert last["samples_seen"] == steps * 4
    assert set(last["skipped"]) == {"bad_image"} and last["skipped"]["bad_image"] > 0
    state = json.loads((checkpoints(run)[-1] / "trainer.json").read_text())
    assert state["samples_trained"] + sum(state["skipped"].values()) == state["samples_seen"] == steps * 4
    assert state["skipped"] == last["skipped"]
