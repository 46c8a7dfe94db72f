"""The report a user sees: the table task's cell F1 beside its exact match (console, Markdown table,
JSON, examples), and the demo's report with its picture grid of examples (``evaluate.grid``)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fusionlm.data.sources.files import WorldSource
from fusionlm.demo import write_report
from fusionlm.evaluate import harness
from fusionlm.evaluate.grid import RIGHT, WRONG, Layout, example_grid, is_right, sample_key
from fusionlm.evaluate.harness import TaskData, evaluate_tasks, markdown_table, question_of, write_results
from fusionlm.evaluate.metrics import table_cell_f1
from fusionlm.evaluate.results import TaskResult
from fusionlm.evaluate.tasks import EvalTask, builtin_tasks
from conftest import WORLD_SIZE, spec_for


@pytest.fixture(scope="module")
def source() -> WorldSource:
    return WorldSource(WORLD_SIZE, 0)


def examples(source, task: str, right: list[bool]) -> list[dict]:
    """Test examples of a world task as the harness writes them: the reference as the answer when
    right, a wrong answer otherwise."""
    out = []
    for i, ok in enumerate(right):
        s = source.get(task, "test", i)
        out.append({"id": s.id, "question": question_of(s), "answer": s.answers[0] if ok else "nothing",
                    "references": s.answers, "score": float(ok)})
    return out


def result(source, task: str, right: list[bool], **kw) -> TaskResult:
    return TaskResult(task, "exact_match", sum(right) / len(right), len(right), examples=examples(source, task, right),
                      **kw)


def one_cell_off(table: str) -> str:
    """The table with the last cell of its last row changed."""
    *rows, last = table.strip().splitlines()
    cells = last.strip().strip("|").split("|")
    cells[-1] = " wrong "
    return "\n".join([*rows, "|" + "|".join(cells) + "|"])


# ----------------------------------------------------------------------------- cell F1 beside exact match


def test_the_table_task_reports_cell_f1_beside_exact_match(make_model, tokenizer, monkeypatch):
    """Same answers, two scores: one table right and one a cell off is 0.5 exact match and a cell F1
    between 0.5 and 1; both in the result, the examples and the console line."""
    (task,) = builtin_tasks(["table"])
    assert task.metric == "table_exact_match" and task.extra_metrics == ["table_cell_f1"]
    first, second = TaskData(task, {}).questions(2)
    answers = {first.id: first.answers[0], second.id: one_cell_off(second.answers[0])}
    monkeypatch.setattr(harness, "generate", lambda model, tok, reqs, spec, **kw: [answers[r.id] for r in reqs])
    model, lines = make_model("unified"), []
    (r,) = evaluate_tasks(model, tokenizer, [task], spec_for(model), per_task=2, progress=lines.append)
    off = table_cell_f1(answers[second.id], second.answers[0])
    assert 0.5 < off < 1
    assert r.metric == "table_exact_match" and r.score == 0.5
    assert r.extra == {"table_cell_f1": pytest.approx((1 + off) / 2)}
    assert [e["score"] for e in r.examples] == [1.0, 0.0]
    assert [e["extra"]["table_cell_f1"] for e in r.examples] == pytest.approx([1.0, off])
    assert lines[-1].startswith("table      table_exact_match  0.500")
    assert lines[-1].endswith(f"0-shot; table_cell_f1 {(1 + off) / 2:.3f})")


def test_tasks_without_extra_metrics_are_reported_as_before(make_model, tokenizer):
    model = make_model("unified")
    (r,) = evaluate_tasks(model, tokenizer, builtin_tasks(["color"]), spec_for(model), per_task=2)
    assert r.extra == {} and all("extra" not in e for e in r.examples)


def test_the_markdown_table_has_a_row_per_extra_metric():
    results = [TaskResult("table", "table_exact_match", 0.1, 500, extra={"table_cell_f1": 0.4123}),
               TaskResult("color", "exact_match", 0.9, 500, shots=2)]
    lines = markdown_table(results).splitlines()
    assert lines[2:] == ["| table | table_exact_match | 0 | 0.100 | 500 |",
                         "| table | table_cell_f1 | 0 | 0.412 | 500 |",
                         "| color | exact_match | 2 | 0.900 | 500 |"]


def test_the_json_keeps_its_keys_and_adds_extra_scores(tmp_path):
    results = [TaskResult("table", "table_exact_match", 0.1, 5, extra={"table_cell_f1": 0.4123}),
               TaskResult("table", "table_exact_match", 0.2, 5, shots=1, extra={"table_cell_f1": 0.5}),
               TaskResult("color", "exact_match", 0.9, 5)]
    write_results(results, tmp_path / "scores.json")
    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["scores"] == {"table": 0.1, "table (1-shot)": 0.2, "color": 0.9}  # the task's own score, as before
    assert data["metrics"]["table"] == "table_exact_match"
    assert data["extra_scores"] == {"table": {"table_cell_f1": 0.4123}, "table (1-shot)": {"table_cell_f1": 0.5}}
    assert "| table | table_cell_f1 | 1 | 0.500 | 5 |" in (tmp_path / "scores.md").read_text()


# ----------------------------------------------------------------------------- the picture grid


def test_world_ids_name_their_split_and_index():
    assert sample_key("test/text/000003") == ("test", 3)
    assert sample_key("val/price/000120") == ("val", 120)
    assert sample_key("q0") is None and sample_key("a/b/c") is None


def test_right_is_half_credit_or_more():
    assert is_right({"score": 1.0}) and is_right({"score": 0.5})
    assert not is_right({"score": 0.49}) and not is_right({"score": 0.0}) and not is_right({})


def frame_colour(png, box) -> tuple[int, int, int]:
    left, top, right, bottom = box
    return png.getpixel((left + 1, (top + bottom) // 2))


def test_the_grid_has_a_row_per_task_and_frames_right_green_wrong_red(source, tmp_path):
    right = {"color": [True, False, True, False], "price": [False, True], "motion": [True], "table": [False]}
    drawn = TaskResult("draw", "geneval", 0.5, 2, examples=[{"id": "geneval/0", "question": "a red circle",
                                                             "score": 1.0}])  # pictures: not a row
    results = [result(source, t, r) for t, r in right.items()] + [drawn]
    layout = Layout()
    grid = example_grid(results, source, tmp_path / "examples.png", per_task=3, layout=layout)
    png = Image.open(tmp_path / "examples.png").convert("RGB")
    assert [label.split("\n")[0] for label in grid.labels] == list(right)
    assert png.height == layout.pad + 4 * (layout.height + layout.pad)
    assert png.width == layout.label + 3 * (layout.width + layout.pad) + layout.pad
    assert [len(row) for row in grid.boxes] == [3, 2, 1, 1]  # per_task caps a row
    for row, oks in zip(grid.boxes, right.values()):
        assert [frame_colour(png, box) for box in row] == [RIGHT if ok else WRONG for ok in oks[:3]]


def picture_colours(png, box, layout: Layout) -> int:
    """How many colours the picture strip of a cell has (1: none drawn)."""
    inner = layout.frame + layout.pad
    strip = png.crop((box[0] + inner, box[1] + inner, box[2] - inner, box[1] + inner + layout.picture))
    return len(strip.getcolors(maxcolors=1 << 16) or range(1 << 16))


def test_the_grid_shows_both_pictures_a_clip_frame_and_none_for_unknown_ids(source, tmp_path):
    unknown = TaskResult("mine", "vqa_accuracy", 0.0, 1, examples=[{"id": "q0", "question": "What?", "answer": "x",
                                                                    "references": ["y"], "score": 0.0}])
    results = [result(source, "price", [True]), result(source, "motion", [True]), unknown]
    layout = Layout()
    grid = example_grid(results, source, tmp_path / "examples.png", layout=layout)
    png = Image.open(tmp_path / "examples.png").convert("RGB")
    price, motion, mine = (picture_colours(png, row[0], layout) for row in grid.boxes)
    assert price > 2 and motion > 2 and mine == 1  # an unknown id: an empty strip, no error
    assert frame_colour(png, grid.boxes[2][0]) == WRONG


# ----------------------------------------------------------------------------- the demo's report


def test_the_demo_report_reads_table_grid_loss_then_wall_time(source, tmp_path):
    (tmp_path / "run").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "run" / "loss.png")
    table = result(source, "table", [True, False])
    table.metric, table.extra = "table_exact_match", {"table_cell_f1": 0.75}
    results = [result(source, "color", [True, True]), table]
    write_report(tmp_path, results, source, {"wall_seconds": 12.5}, "Recipe `demo`; wall time 12 s.")
    md = (tmp_path / "report.md").read_text()
    order = ["| color | exact_match | 0 | 1.000 | 2 |", "| table | table_exact_match | 0 | 0.500 | 2 |",
             "| table | table_cell_f1 | 0 | 0.750 | 2 |", "![examples](examples.png)", "![loss](run/loss.png)",
             "Recipe `demo`; wall time 12 s."]
    assert all(s in md for s in order) and [md.index(s) for s in order] == sorted(md.index(s) for s in order)
    assert Image.open(tmp_path / "examples.png").height == Layout().pad + 2 * (Layout().height + Layout().pad)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["scores"] == {"color": 1.0, "table": 0.5} and report["wall_seconds"] == 12.5
    assert report["extra_scores"] == {"table": {"table_cell_f1": 0.75}}


def test_the_demo_report_links_no_loss_plot_that_is_not_there(source, tmp_path):
    write_report(tmp_path, [result(source, "color", [True])], source, {}, "wall time 1 s.")
    md = (tmp_path / "report.md").read_text()
    assert "![examples](examples.png)" in md and "loss.png" not in md and md.endswith("wall time 1 s.\n")


def test_a_task_file_may_name_extra_metrics(tmp_path):
    from fusionlm.evaluate.tasks import load_task_file

    (tmp_path / "tasks.yaml").write_text("- {name: table, metric: table_exact_match, extra_metrics: [table_cell_f1]}\n"
                                         "- {name: color, metric: exact_match}\n")
    assert [t.extra_metrics for t in load_task_file(tmp_path / "tasks.yaml")] == [["table_cell_f1"], []]
    assert EvalTask(name="x", metric="exact_match").extra_metrics == []
