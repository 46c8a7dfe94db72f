"""The evaluation harness: tasks as data, k-shot prompts, own data files, batch independence,
questions over the context skipped and reported; and `fusionlm compare` end to end on a tiny budget."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fusionlm.cli import main
from fusionlm.data.sources.formats import read_qa_jsonl
from fusionlm.errors import ConfigError, SampleError
from fusionlm.evaluate.harness import TaskData, evaluate_tasks, request_of, write_results
from fusionlm.evaluate.tasks import EvalTask, builtin_tasks, load_task_file
from conftest import spec_for
from helpers_train import stage, tiny_dict, write_recipe


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """A question JSONL with images: six colour questions, two of them multiple choice."""
    root = tmp_path_factory.mktemp("qa")
    lines = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 200, 30))] * 2):
        Image.new("RGB", (24, 16), rgb).save(root / f"{i}.png")
        rec = {"id": f"q{i}", "image": f"{i}.png", "question": "What colour is the picture?", "answers": [name]}
        if i >= 4:
            rec |= {"choices": ["red", "blue", "green"], "answers": [name]}
        lines.append(json.dumps(rec))
    (root / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return root / "qa.jsonl"


def write_qa(path, long: bool):
    """Four colour questions (ids q0-q3); with ``long``, q2's prompt is far over the tiny models'
    context of 128 tokens."""
    lines = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 200, 30)),
                                     ("red", (200, 40, 40))]):
        Image.new("RGB", (24, 16), rgb).save(path.parent / f"{i}.png")
        question = "What colour is the picture?" + (" Look closely." * 80 if long and i == 2 else "")
        lines.append(json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": question, "answers": [name]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def long_qa_file(tmp_path_factory):
    return write_qa(tmp_path_factory.mktemp("long") / "qa.jsonl", long=True)


def test_jsonl_reads_questions_images_and_choices(qa_file):
    samples = read_qa_jsonl(qa_file)
    assert len(samples) == 6 and samples[0].messages[0]["content"].startswith("<image>\n")
    assert samples[0].answers == ["red"] and samples[0].images[0].endswith("0.png")
    mc = samples[5]
    assert "A. red\nB. blue\nC. green" in mc.messages[0]["content"] and mc.answers == ["C", "red", "blue", "green"]


def test_a_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n{"question": 3}\n')
    with pytest.raises(SampleError, match=r"bad\.jsonl: line 2 \(id 2\): missing key 'question'"):
        read_qa_jsonl(tmp_path / "bad.jsonl")


def test_k_shot_examples_never_include_the_question(qa_file):
    data = TaskData(EvalTask(name="custom", metric="vqa_accuracy", data=str(qa_file)), {})
    questions = data.questions(6)
    for i, q in enumerate(questions):
        prompt = data.with_shots(q, i, 3, seed=0)
        assert len(prompt.messages) == 8 and len(prompt.images) == 4 and prompt.images[-1] == q.images[0]
        assert q.images[0] not in prompt.images[:-1]  # the other samples of the file, never this one
        assert data.with_shots(q, i, 3, seed=0).images == prompt.images  # a fixed seed: the same examples
    assert any(data.with_shots(q, i, 3, seed=1).images != data.with_shots(q, i, 3, seed=0).images
               for i, q in enumerate(questions))


def test_world_shots_are_drawn_from_the_val_split(monkeypatch):
    data = TaskData(EvalTask(name="color", metric="exact_match"), {})
    q = data.questions(1)[0]
    splits = []
    real_get = data.source.get
    monkeypatch.setattr(data.source, "get", lambda task, split, i: splits.append(split) or real_get(task, split, i))
    data.with_shots(q, 0, 3, seed=0)
    assert q.id.startswith("test/") and splits == ["val"] * 3


def test_world_shots_come_from_the_val_split(world):
    data = TaskData(EvalTask(name="shape", metric="exact_match"), {})
    q = data.questions(1)[0]
    prompt = data.with_shots(q, 0, 2, seed=0)
    request = request_of(prompt)
    assert [m["role"] for m in request.history] == ["user", "assistant"] * 2
    assert q.id.startswith("test/")
    assert len(request.images) == 3 and request.images[-1] is q.images[-1]


def test_results_do_not_depend_on_batch_size(make_model, tokenizer, qa_file):
    model = make_model("unified")
    spec = spec_for(model)
    tasks = builtin_tasks(["color", "price"]) + [EvalTask(name="mine", metric="vqa_accuracy", data=str(qa_file))]
    one = evaluate_tasks(model, tokenizer, tasks, spec, per_task=6, batch_size=1, shots=1)
    many = evaluate_tasks(model, tokenizer, tasks, spec, per_task=6, batch_size=4, shots=1)
    assert [[e["answer"] for e in r.examples] for r in one] == [[e["answer"] for e in r.examples] for r in many]
    assert [r.n for r in one] == [6, 6, 6] and all(r.shots == 1 for r in one)


def test_a_question_over_the_context_is_skipped_counted_and_reported(make_model, tokenizer, long_qa_file, tmp_path):
    """One question too long for the context does not end the eval: it is skipped, the task is
    scored on the others (as if it were not there), and the results name it."""
    model = make_model("unified")
    spec = spec_for(model)
    (tmp_path / "short").mkdir()
    short = write_qa(tmp_path / "short" / "qa.jsonl", long=False)
    task = EvalTask(name="mine", metric="vqa_accuracy", data=str(long_qa_file))
    (result,) = evaluate_tasks(model, tokenizer, [task], spec, per_task=4, batch_size=4)
    assert result.skipped == ["q2"] and result.n == 3
    assert [e["id"] for e in result.examples] == ["q0", "q1", "q3"]
    (others,) = evaluate_tasks(model, tokenizer, [EvalTask(name="mine", metric="vqa_accuracy", data=str(short))],
                               spec, per_task=4, batch_size=4)
    kept = [e for e in others.examples if e["id"] != "q2"]
    assert [e["answer"] for e in result.examples] == [e["answer"] for e in kept]
    assert result.score == pytest.approx(sum(e["score"] for e in kept) / 3)
    (shots,) = evaluate_tasks(model, tokenizer, [task], spec, per_task=4, batch_size=4, shots=1)
    assert shots.skipped == ["q2"] and shots.n == 3  # nor as an example: dropped to fit
    write_results([result, shots], tmp_path / "scores.json")
    data = json.loads((tmp_path / "scores.json").read_text())
    reason = "the prompt does not fit the context of 128 tokens"
    assert data["skipped"] == {"mine": {"n": 1, "reason": reason, "ids": ["q2"]},
                               "mine (1-shot)": {"n": 1, "reason": reason, "ids": ["q2"]}}
    assert data["n"] == {"mine": 3, "mine (1-shot)": 3}
    assert f"skipped: mine (0-shot): 1 question(s), {reason}: q2" in (tmp_path / "scores.md").read_text()


def test_task_file(tmp_path, qa_file):
    (tmp_path / "tasks.yaml").write_text(
        f"- {{name: mine, data: {qa_file}, metric: choice_accuracy, prompt: '{{question}} Be brief.'}}\n"
        "- {name: color, metric: exact_match}\n")
    tasks = load_task_file(tmp_path / "tasks.yaml")
    assert [t.name for t in tasks] == ["mine", "color"] and tasks[1].data == "synthetic"
    (tmp_path / "bad.yaml").write_text("- {name: x}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: task 0: missing key 'metric'"):
        load_task_file(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("- {name: x, metric: exact_match, prompt: 'no slot'}\n")
    with pytest.raises(ConfigError, match=r"prompt must contain \{question\}"):
        load_task_file(tmp_path / "bad2.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    recipe = write_recipe(root / "tiny.yaml", tiny_dict(stages=[stage("s", steps=4)]))
    assert main(["train", str(recipe), "--out", str(root / "run")]) == 0
    return root / "run"


def test_cli_eval_with_a_task_file_and_shots(run_dir, qa_file, tmp_path, capsys):
    (tmp_path / "tasks.yaml").write_text(f"- {{name: mine, data: {qa_file}, metric: vqa_accuracy}}\n")
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", str(tmp_path / "tasks.yaml"), "--shots", "0", "2",
                 "--per-task", "4", "--out", str(tmp_path / "scores.json")]) == 0
    data = json.loads((tmp_path / "scores.json").read_text())
    assert set(data["scores"]) == {"mine", "mine (2-shot)"} and data["n"]["mine"] == 4
    assert "| mine | vqa_accuracy | 2 |" in (tmp_path / "scores.md").read_text()


def test_cli_eval_reports_skipped_questions(run_dir, long_qa_file, tmp_path, capsys):
    (tmp_path / "tasks.yaml").write_text(f"- {{name: mine, data: {long_qa_file}, metric: vqa_accuracy}}\n")
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", str(tmp_path / "tasks.yaml"), "--per-task", "4"]) == 0
    out = capsys.readouterr().out
    assert "(n=3, 0-shot, skipped 1 over the context)" in out and "| mine | vqa_accuracy | 0 |" in out
    assert "skipped: mine (0-shot): 1 question(s), the prompt does not fit the context of 128 tokens: q2" in out


def test_compare_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    recipes = []
    for name, fusion in (("a", "unified"), ("b", "cross_attention")):
        data = tiny_dict()
        data["model"]["fusion"] = {"kind": fusion, "every_n": 1}
        data["stages"] = [stage("text", stand_in_for="llm", train=["llm"], mixture={"text_only": 1}, steps=4),
                          stage("mm", train=["connector", "cross_attention"] if fusion != "unified" else ["all"],
                                mixture={"color": 1, "shape": 1}, steps=4)]
        recipes.append(str(write_recipe(tmp_path / f"{name}.yaml", data)))
    assert main(["compare", *recipes, "--steps", "6", "--out", str(tmp_path / "cmp"), "--per-task", "2",
                 "--shots", "0", "1"]) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["recipe"] for r in results] == ["a", "b"] and all(r["steps"] == 6 for r in results)
    b = results[1]
    assert b["text_loss_before"] == b["text_loss_after"]  # a frozen LLM: its text is untouched
    assert results[0]["text_loss_before"] != results[0]["text_loss_after"]
    assert set(b["scores"]) == {"0-shot", "1-shot"} and b["latency_ms"] > 0 and b["image_tokens_per_image"] == 1
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| `a` | unified, mlp |" in report and "## Scores, 1-shot" in report
    for png in ("loss.png", "scores.png", "cost_vs_score.png"):
        assert (tmp_path / "cmp" / png).stat().st_size > 1000
    assert main(["compare", recipes[0], "--out", str(tmp_path / "x")]) == 2  # no budget given
    assert "--steps N or --minutes M" in capsys.readouterr().err


def test_a_time_budget_ends_stages_early(tmp_path):
    from fusionlm.config import from_dict, validate
    from fusionlm.train.loop import train
    from helpers_train import read_metrics

    data = tiny_dict()
    data["stages"] = [stage("s0", steps=1000), stage("s1", steps=1000)]
    progress = train(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None, seconds=2.0)
    rows = read_metrics(tmp_path / "run")
    assert 0 < progress.step < 2000 and {r["stage"] for r in rows} == {0, 1}  # both stages got their share


def test_evaluation_leaves_the_callers_image_spec_as_it_was(make_model, tokenizer, qa_file, monkeypatch):
    """Each task's images are read under its own data's root, in a copy of the caller's spec."""
    from dataclasses import replace

    from fusionlm.evaluate import harness

    seen = []
    monkeypatch.setattr(harness, "generate",
                        lambda model, tok, reqs, spec, **kw: seen.append(spec.root) or [""] * len(reqs))
    model = make_model("unified")
    spec = spec_for(model)
    before = replace(spec)
    tasks = builtin_tasks(["color"]) + [EvalTask(name="mine", metric="vqa_accuracy", data=str(qa_file))]
    evaluate_tasks(model, tokenizer, tasks, spec, per_task=2)
    assert spec == before
    assert len(set(seen)) == 2 and str(qa_file.parent) in {str(r) for r in seen}  # one root per task's data
