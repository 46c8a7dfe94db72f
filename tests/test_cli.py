"""The `fusionlm` command end to end on a tiny trained model: data, generate, eval, demo, and
one-line errors for bad inputs; its spellings (flags, help, deprecated positionals) without a model."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from fusionlm.cli import main, parser
from fusionlm.config import load_recipe
from fusionlm.errors import FusionError
from fusionlm.data.sources.formats import read_llava_json
from fusionlm.data.sample import TASKS
from fusionlm.data.pixels.video import Video
from fusionlm.evaluate.harness import EVAL_TASKS
from tests.test_images import png_with_size
from tests.helpers_train import TINY_OVERRIDES, stage, tiny_dict, write_recipe


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model trained for 6 steps on colour and shape questions."""
    root = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(root / "tiny.yaml", tiny_dict(stages=[stage("s", steps=6)]))
    assert main(["train", str(recipe), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "shape.png"
    img = Image.new("RGB", (32, 32), "white")
    img.paste((220, 30, 30), (8, 8, 24, 24))
    img.save(path)
    return path


# ----------------------------------------------------------------------------- data


def test_data_writes_pngs_and_a_readable_json(tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "data", "synth", "--out", tmp_path / "d", "--n", "2", "--image-size", "32")
    assert rc == 0 and "data.json" in out
    samples = read_llava_json(tmp_path / "d" / "data.json")
    assert len(samples) == 2 * len(TASKS)
    assert {s.task for s in samples} == set(TASKS)
    images = [p for s in samples for p in s.images if not isinstance(p, Video)]
    assert images and all(Path(p).is_file() and Path(p).suffix == ".png" for p in images)
    clips = [p for s in samples for p in s.images if isinstance(p, Video)]
    assert len(clips) == 2 and all(Path(c.source).suffix == ".gif" for c in clips)  # the motion task's
    assert len(set(images)) == len(images)
    with Image.open(images[0]) as im:
        assert im.size == (32, 32)
    assert sorted(Path(p).name for p in images) == sorted(p.name for p in (tmp_path / "d" / "images").iterdir())


def test_data_tasks_and_split(tmp_path, capsys):
    rc, _, _ = run_cli(capsys, "data", "synth", "--out", tmp_path, "--n", "1", "--tasks", "color", "--split", "val",
                       "--image-size", "32")
    assert rc == 0
    (sample,) = read_llava_json(tmp_path / "data.json")
    assert sample.task == "color" and sample.id.startswith("val/")


def test_data_without_a_subcommand_is_the_old_synth(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "data", "--out", tmp_path, "--n", "1", "--tasks", "color", "--image-size", "32")
    assert rc == 0 and "data.json" in out
    assert err.splitlines() == ["fusionlm data: `fusionlm data --out …` without a subcommand is deprecated; "
                                "use `fusionlm data synth --out …`"]
    assert [s.task for s in read_llava_json(tmp_path / "data.json")] == ["color"]


def test_data_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data"])
    assert exit_.value.code == 2 and "{synth,check}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- spellings


def _parsers(p: argparse.ArgumentParser, path=("fusionlm",)):
    """(command path, parser) for the parser and every subcommand's, depth first."""
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_argument_and_subcommand_has_help():
    missing = []
    for path, p in _parsers(parser()):
        actions = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
        for action in actions + [c for a in actions if isinstance(a, argparse._SubParsersAction)
                                 for c in a._choices_actions]:
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    assert missing == []


@pytest.mark.parametrize("path", [path[1:] for path, _ in _parsers(parser())])
def test_help_prints_for_every_command(capsys, path):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {' '.join(('fusionlm', *path))}")


@pytest.mark.parametrize("argv", [["train", "r", "--out", "o"], ["demo"], ["info", "r"], ["compare", "r", "--out", "o"],
                                  ["data", "check", "s"]])
def test_set_takes_several_pairs_and_repeats(argv):
    args = parser().parse_args([*argv, "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]


MOVED = {  # the new and the old spelling, the call both make, old's line; both spellings, and neither: that flag
    "export": dict(new=["export", "--checkpoint", "C", "--out", "O", "--format", "llava"],
                   old=["export", "C", "O", "--format", "llava"],
                   call=(("C", "O", "llava"), {}),
                   line="fusionlm export: the positional CHECKPOINT OUT is deprecated; "
                        "use --checkpoint CHECKPOINT --out OUT",
                   both=(["export", "C", "--checkpoint", "C", "--out", "O", "--format", "llava"], "--checkpoint"),
                   neither=(["export", "--checkpoint", "C", "--format", "llava"], "--out")),
    "import": dict(new=["import", "S", "--out", "O"],
                   old=["import", "S", "O"],
                   call=(("S", "O"), {"dtype": "float32", "allow_custom_code": False}),
                   line="fusionlm import: the positional OUT is deprecated; use --out OUT",
                   both=(["import", "S", "O", "--out", "O"], "--out"),
                   neither=(["import", "S"], "--out")),
}


@pytest.fixture
def calls(monkeypatch) -> list:
    """What import and export were called with (they are not run)."""
    import fusionlm.interop

    seen = []
    for name in ("import_checkpoint", "export_checkpoint"):
        monkeypatch.setattr(fusionlm.interop, name, lambda *a, **kw: seen.append((a, kw)))
    return seen


@pytest.mark.parametrize("command", list(MOVED))
def test_flags_and_the_deprecated_positionals_do_the_same(capsys, calls, command):
    case = MOVED[command]
    rc, _, err = run_cli(capsys, *case["new"])
    assert rc == 0 and err == ""
    rc, _, err = run_cli(capsys, *case["old"])
    assert rc == 0 and err.splitlines() == [case["line"]]
    assert calls == [case["call"], case["call"]]


@pytest.mark.parametrize("command", list(MOVED))
def test_both_spellings_or_neither_is_a_usage_error(capsys, calls, command):
    (both, flag), (neither, missing) = MOVED[command]["both"], MOVED[command]["neither"]
    with pytest.raises(SystemExit) as exit_:
        main(both)
    last = capsys.readouterr().err.splitlines()[-1]
    assert exit_.value.code == 2 and f"argument {flag}: not allowed with the positional" in last
    with pytest.raises(SystemExit) as exit_:
        main(neither)
    last = capsys.readouterr().err.splitlines()[-1]
    assert exit_.value.code == 2 and last.endswith(f"the following arguments are required: {missing}")
    assert calls == []


@pytest.mark.parametrize("argv, flags", [
    (["--data", "d.json", "--tasks-file", "t.yaml"], ("--data", "--tasks-file")),
    (["--data", "d.json", "--tasks", "t.yaml"], ("--data", "--tasks-file")),  # the old spelling of --tasks-file
    (["--tasks", "color", "--tasks-file", "t.yaml"], ("--tasks", "--tasks-file")),
])
def test_eval_a_task_file_with_data_or_task_names_is_a_usage_error(capsys, argv, flags):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", "nowhere", *argv])  # refused before any checkpoint is read
    last = capsys.readouterr().err.splitlines()[-1]
    assert exit_.value.code == 2 and f"argument {flags[0]}: not allowed with {flags[1]}" in last


@pytest.fixture
def devices(monkeypatch) -> list:
    """The device each load_model call asked for; the call then fails (no model is built)."""
    import fusionlm.checkpoint

    seen = []

    def load_model(path, *, device):
        seen.append(device)
        raise FusionError("stopped after load_model")

    monkeypatch.setattr(fusionlm.checkpoint, "load_model", load_model)
    return seen


@pytest.mark.parametrize("argv", [["generate", "--checkpoint", "c", "--prompt", "p"], ["eval", "--checkpoint", "c"]])
def test_device_is_passed_to_load_model(capsys, devices, argv):
    for device in (None, "cpu", "cuda:1", "mps"):
        rc, _, err = run_cli(capsys, *argv, *(["--device", device] if device else []))
        assert rc == 2 and "stopped after load_model" in err
    assert devices == ["auto", "cpu", "cuda:1", "mps"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--device", "gpu"])
    assert exit_.value.code == 2 and "'gpu' is not a device" in capsys.readouterr().err and len(devices) == 4


# ----------------------------------------------------------------------------- generate


def test_generate_from_a_run_and_from_a_checkpoint(run_dir, image, capsys):
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--image", image,
                           "--prompt", "What colour is the shape?", "--max-new-tokens", "8")
    assert rc == 0, err
    assert out.endswith("\n") and err == ""
    (ckpt,) = (run_dir / "checkpoints").glob("step-*")
    rc2, out2, err2 = run_cli(capsys, "generate", "--checkpoint", ckpt, "--image", image,
                              "--prompt", "What colour is the shape?", "--max-new-tokens", "8")
    assert rc2 == 0, err2
    assert out2 == out  # greedy: the same checkpoint gives the same answer


def test_generate_with_the_marker_in_the_prompt(run_dir, image, capsys):
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--image", image, "--image", image,
                           "--prompt", "<image> and <image>: same colour?", "--max-new-tokens", "4")
    assert rc == 0 and out.endswith("\n"), err


def test_generate_about_a_clip(run_dir, tmp_path, capsys):
    from fusionlm.data.world import World
    from fusionlm.data.pixels.video import Video

    clip = World(image_size=32, seed=0).sample("motion", "test", 0).images[0]
    assert isinstance(clip, Video)
    gif = tmp_path / "clip.gif"
    clip.source[0].save(gif, save_all=True, append_images=clip.source[1:], duration=100)
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--video", gif,
                           "--prompt", "Which way does the circle move?", "--max-new-tokens", "3")
    assert rc == 0 and out.endswith("\n"), err
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--video", tmp_path / "nope.gif",
                         "--prompt", "Which way?")
    assert rc == 2 and "nope.gif: file not found" in err


# ----------------------------------------------------------------------------- eval


def test_eval_writes_scores_per_task_and_a_table(run_dir, tmp_path, capsys):
    out_json = tmp_path / "scores.json"
    rc, out, err = run_cli(capsys, "eval", "--checkpoint", run_dir, "--per-task", "2", "--out", out_json)
    assert rc == 0, err
    data = json.loads(out_json.read_text())
    assert set(data["scores"]) == set(EVAL_TASKS)
    assert all(0.0 <= v <= 1.0 or k == "caption" for k, v in data["scores"].items())
    assert data["n"] == {t: 2 for t in EVAL_TASKS}
    assert all(len(data["examples"][t]) == 2 for t in EVAL_TASKS)
    assert data["metrics"]["caption"] == "cider" and data["metrics"]["table"] == "table_exact_match"
    table = out_json.with_suffix(".md").read_text()
    assert table.startswith("| task | metric | shots | score | n |")
    assert all(f"| {t} |" in table for t in EVAL_TASKS)
    assert "| color | exact_match |" in out


def test_eval_on_a_llava_json(run_dir, tmp_path, capsys):
    assert run_cli(capsys, "data", "synth", "--out", tmp_path / "d", "--n", "2", "--tasks", "color", "--split", "test",
                   "--image-size", "32")[0] == 0
    out_json = tmp_path / "s.json"
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", run_dir, "--data", tmp_path / "d" / "data.json",
                         "--per-task", "2", "--out", out_json)
    assert rc == 0, err
    assert list(json.loads(out_json.read_text())["scores"]) == ["color"]


def test_eval_tasks_names_the_tasks_to_score(run_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", run_dir, "--tasks", "color", "shape", "--per-task", "2",
                         "--out", tmp_path / "s.json")
    assert rc == 0, err
    assert set(json.loads((tmp_path / "s.json").read_text())["scores"]) == {"color", "shape"}
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", run_dir, "--tasks", "colour")
    assert rc == 2 and "eval --tasks: no task 'colour' in the data" in err


def test_eval_tasks_file_and_its_old_spelling(run_dir, tmp_path, capsys):
    (tmp_path / "tasks.yaml").write_text("- {name: mine, task: color, metric: exact_match}\n")
    lines = []
    for flag in ("--tasks-file", "--tasks"):
        rc, _, err = run_cli(capsys, "eval", "--checkpoint", run_dir, flag, tmp_path / "tasks.yaml", "--per-task", "2",
                             "--out", tmp_path / f"{flag}.json")
        assert rc == 0, err
        assert list(json.loads((tmp_path / f"{flag}.json").read_text())["scores"]) == ["mine"]
        lines.append(err.splitlines())
    assert lines == [[], ["fusionlm eval: --tasks FILE.yaml is deprecated; use --tasks-file FILE.yaml "
                          "(--tasks names tasks)"]]


# ----------------------------------------------------------------------------- bad inputs to generate


def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A 1x1 PNG whose header claims width x height, CRC fixed so only the size is wrong."""
    return png_with_size(path, width, height)


def _truncated_png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_IMAGES = {
    "missing.png": (lambda p: p, "file not found"),
    "empty.png": (lambda p: (p.write_bytes(b""), p)[1], "empty"),
    "truncated.png": (_truncated_png, "truncated"),
    "page.jpg": (lambda p: (p.write_text("<html><body>404</body></html>"), p)[1], "not a recognised image"),
    "bomb.png": (_bomb_png, "900000000 pixels"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_generate_bad_image_is_one_line(run_dir, tmp_path, capsys, name):
    make, reason = BAD_IMAGES[name]
    path = make(tmp_path / name)
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--image", path, "--prompt", "What colour?")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and reason in lines[0], lines[0]


def test_generate_bomb_refused_from_the_header_under_a_low_limit(run_dir, tmp_path, capsys, monkeypatch):
    """A 100x100 header is under Pillow's own cap: only data.max_image_pixels refuses it."""
    import fusionlm.cli as cli

    original = cli._load

    def low_limit(checkpoint, device):
        model, tok, config, spec = original(checkpoint, device)
        spec.max_pixels = 5000
        return model, tok, config, spec

    monkeypatch.setattr(cli, "_load", low_limit)
    path = _bomb_png(tmp_path / "b.png", 100, 100)
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--image", path, "--prompt", "x")
    assert rc == 2 and "10000 pixels, over the limit of 5000" in err


@pytest.mark.parametrize("prompt, images, match", [
    ("<image> <image> compare", 1, "2 <image> placeholder(s) in the text but 1 image"),
    ("<image> what colour?", 0, "1 <image> placeholder(s) in the text but 0 image"),
    (" ".join(["word"] * 5000), 0, "over the context of 128"),
])
def test_generate_bad_prompt_is_one_line(run_dir, image, capsys, prompt, images, match):
    argv = ["generate", "--checkpoint", run_dir, "--prompt", prompt]
    for _ in range(images):
        argv += ["--image", image]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and match in err, err


def test_generate_missing_checkpoint_is_one_line(tmp_path, image, capsys):
    missing = tmp_path / "no-such-run"
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", missing, "--image", image, "--prompt", "x")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert str(missing) in err and "no complete checkpoint" in err


def test_generate_subprocess_no_traceback(run_dir, tmp_path):
    path = _truncated_png(tmp_path / "cut.png")
    exe = Path(sys.executable).with_name("fusionlm")
    proc = subprocess.run([str(exe), "generate", "--checkpoint", str(run_dir), "--image", str(path),
                           "--prompt", "What colour is the shape?"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], proc.stderr


# ----------------------------------------------------------------------------- odd but valid images


def _rgb(size=(20, 20)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    img.paste((30, 70, 220), (0, 0, max(1, size[0] // 2), max(1, size[1] // 2)))
    return img


def _palette_transparent(p: Path) -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 220, 30, 30] + [0] * 762)
    img.paste(1, (5, 5, 15, 15))
    img.save(p, transparency=0)


def _sixteen_bit(p: Path) -> None:
    arr = np.linspace(0, 65535, 20 * 20).astype(np.uint16).reshape(20, 20)
    Image.fromarray(arr).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")


def _exif_jpeg(p: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    _rgb((24, 12)).save(p, "JPEG", exif=exif.tobytes())


def _gif(p: Path) -> None:
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)


ODD_IMAGES = {
    "rgba.png": lambda p: Image.new("RGBA", (20, 20), (255, 0, 0, 100)).save(p),
    "la.png": lambda p: Image.new("LA", (20, 20), (80, 128)).save(p),
    "palette_transparency.png": _palette_transparent,
    "one_bit.png": lambda p: Image.new("1", (20, 20), 1).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (20, 20), (0, 200, 200, 0)).save(p, "JPEG"),
    "sixteen_bit.png": _sixteen_bit,
    "exif_rotated.jpg": _exif_jpeg,
    "animated.gif": _gif,
    "picture.webp": lambda p: _rgb().save(p, "WEBP"),
    "one_pixel.png": lambda p: _rgb((1, 1)).save(p),
    "thin_1x500.png": lambda p: _rgb((1, 500)).save(p),
    "wide_2000x20.png": lambda p: _rgb((2000, 20)).save(p),
}


@pytest.mark.parametrize("name", list(ODD_IMAGES))
def test_generate_answers_for_odd_valid_images(run_dir, tmp_path, capsys, name):
    if name.endswith(".webp") and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / name
    ODD_IMAGES[name](path)
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--image", path,
                           "--prompt", "What colour is the shape?", "--max-new-tokens", "3")
    assert rc == 0, err
    assert err == "" and out.endswith("\n")


# ----------------------------------------------------------------------------- demo


def test_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    sets = TINY_OVERRIDES + ["train.eval_per_task=2", "train.checkpoint_every=0", "model.encoder.patch_size=4"]
    for i in range(len(load_recipe("demo").stages)):  # one step each
        sets += [f"stages.{i}.steps=1", f"stages.{i}.warmup_steps=1", f"stages.{i}.batch_size=4"]
    argv = ["demo", "--out", tmp_path / "demo"]
    for s in sets:
        argv += ["--set", s]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    taught = [t for t in EVAL_TASKS if t != "motion"]  # the demo scores the tasks its recipe trains on
    assert set(report["scores"]) == set(taught) and len(EVAL_TASKS) == 10
    assert report["wall_seconds"] > 0 and report["steps"] == 4
    assert report["n"] == {t: 2 for t in taught}
    md = (tmp_path / "demo" / "report.md").read_text()
    assert all(f"| {t} |" in md for t in taught) and "| motion |" not in md
    assert (tmp_path / "demo" / "example.png").is_file()
    assert (tmp_path / "demo" / "examples.png").is_file() and "![examples](examples.png)" in md  # the picture grid
    assert (tmp_path / "demo" / "run" / "checkpoints" / "step-000004" / "model.safetensors").is_file()
    assert "report:" in out


def test_the_cli_mutes_only_the_known_noisy_warnings():
    import warnings

    from fusionlm import cli

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._quiet()
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning)
        warnings.warn("a warning nobody has seen before", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning nobody has seen before"]


def test_export_offers_every_registered_format():
    from fusionlm.cli import parser
    from fusionlm.interop import FORMATS

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    formats = next(a for a in sub.choices["export"]._actions if a.dest == "format")
    assert set(formats.choices) == set(FORMATS.names()) | {"fusionlm"}
