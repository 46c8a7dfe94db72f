"""Scores: exact match after normalisation, table match, and CIDEr against pycocoevalcap's own scorer."""

from __future__ import annotations

import pytest
from pycocoevalcap.cider.cider import Cider

from fusionlm.data.synthetic import table_markdown
from fusionlm.evaluate.metrics import cider, exact_match, metric_for, normalize, score_task, table_match


@pytest.mark.parametrize("prediction, answers", [
    ("red", ["red"]),
    ("Red.", ["red"]),
    ("  RED  ", ["red"]),
    ("red!", ["blue", "red"]),
    ("a large red circle,  in the top left", ["a large red circle in the top left"]),
    ("3", ["3"]),
    ("Yes", ["yes"]),
    ("left-of", ["left-of"]),
])
def test_exact_match_normalises(prediction, answers):
    assert exact_match(prediction, answers) == 1.0


@pytest.mark.parametrize("prediction, answers", [
    ("blue", ["red"]),
    ("re d", ["red"]),
    ("red circle", ["red"]),
    ("", ["red"]),
    ("3", ["13"]),
    ("no", ["yes"]),
    ("red", []),
])
def test_exact_match_rejects_different_answers(prediction, answers):
    assert exact_match(prediction, answers) == 0.0


def test_normalize_keeps_table_characters_and_collapses_space():
    assert normalize("  Hello,\tWorld!  ") == "hello world"
    assert normalize("| a | b |") == "| a | b |"
    assert normalize("x-y") == "x-y"


REFERENCE = table_markdown(("cat", "dog"), (1, 2))


@pytest.mark.parametrize("prediction", [
    REFERENCE,
    "| cat | dog |\n| --- | --- |\n| 1 | 2 |",
    "|cat|dog|\n|---|---|\n|1|2|",
    "| cat | dog |\n|:---|---:|\n| 1 | 2 |",
    "| cat | dog |\n| :-: | - |\n| 1 | 2 |",
    "cat | dog\n--- | ---\n1 | 2",
    "\n  | Cat |   Dog |\n| --- | --- |\n|  1  | 2 |  \n",
])
def test_table_match_ignores_spacing_and_alignment_rows(prediction):
    assert REFERENCE == "| cat | dog |\n| --- | --- |\n| 1 | 2 |"
    assert table_match(prediction, [REFERENCE]) == 1.0


@pytest.mark.parametrize("prediction", [
    "| cat | dog |\n| --- | --- |\n| 1 | 3 |",  # a wrong cell
    "| dog | cat |\n| --- | --- |\n| 2 | 1 |",  # columns swapped
    "| cat | dog |\n| --- | --- |",  # row missing
    "| cat | dog |\n| --- | --- |\n| 1 | 2 |\n| 3 | 4 |",  # row added
    "| cat | dog | |\n| --- | --- | --- |\n| 1 | 2 | |",  # column added
    "| cat | dog |\n|  |  |\n| 1 | 2 |",  # an empty row is not an alignment row
    "cat dog 1 2",
])
def test_table_match_rejects_wrong_tables(prediction):
    assert table_match(prediction, [REFERENCE]) == 0.0


def test_empty_cells_are_not_an_alignment_row():
    assert table_match("| a | b |\n| --- | --- |\n|  |  |", ["| a | b |\n| --- | --- |\n| - | - |"]) == 0.0


# ----------------------------------------------------------------------------- CIDEr

REFS = [
    ["a large red circle in the top left", "a red circle at the top left", "big red circle top left"],
    ["a small blue square in the bottom right", "a blue square at the bottom right", "small blue square"],
    ["a green triangle in the middle", "a green triangle in the centre", "green triangle centre"],
]
PREDS = ["a red circle in the top left", "a blue square at the bottom", "a green circle"]


def test_cider_equals_pycocoevalcap():
    expected, expected_per = Cider().compute_score({i: r for i, r in enumerate(REFS)},
                                                   {i: [p] for i, p in enumerate(PREDS)})
    score, per = cider(PREDS, REFS)
    assert score == pytest.approx(float(expected), rel=1e-9)
    assert per == pytest.approx([float(x) for x in expected_per], rel=1e-9)
    assert score > 0


def test_cider_normalises_like_exact_match():
    shouty = ["A Red Circle, in the TOP left!", "a blue square at the bottom.", "A green circle"]
    (a, per_a), (b, per_b) = cider(shouty, REFS), cider(PREDS, REFS)
    assert a == pytest.approx(b) and per_a == pytest.approx(per_b)


def test_cider_prefers_a_perfect_caption():
    perfect = [refs[0] for refs in REFS]
    partial = ["a red circle", "a blue square", "a green triangle"]
    wrong = ["the sky is grey", "two words", "nothing here"]
    s_perfect, per_perfect = cider(perfect, REFS)
    s_partial, per_partial = cider(partial, REFS)
    s_wrong, _ = cider(wrong, REFS)
    assert s_perfect > s_partial > s_wrong >= 0.0
    assert all(a > b for a, b in zip(per_perfect, per_partial))


def test_cider_empty_prediction_scores_zero_and_no_predictions():
    score, per = cider(["", PREDS[1], PREDS[2]], REFS)
    assert per[0] == 0.0 and len(per) == 3
    assert cider([], []) == (0.0, [])


@pytest.mark.parametrize("task, metric, preds, refs, score", [
    ("color", "exact_match", ["red", "Blue.", "green"], [["red"], ["blue"], ["red"]], 2 / 3),
    ("count", "exact_match", ["3", "4"], [["3"], ["5"]], 0.5),
    ("table", "table_exact_match", [REFERENCE, "| cat |"], [[REFERENCE], [REFERENCE]], 0.5),
    ("custom", "exact_match", ["x"], [["x"]], 1.0),
])
def test_score_task_per_sample(task, metric, preds, refs, score):
    assert metric_for(task) == metric
    total, per = score_task(task, preds, refs)
    assert len(per) == len(preds)
    assert total == pytest.approx(score)
    assert total == pytest.approx(sum(per) / len(per))


def test_score_task_caption_uses_cider():
    assert metric_for("caption") == "cider"
    total, per = score_task("caption", PREDS, REFS)
    assert (total, per) == cider(PREDS, REFS)
    assert len(per) == 3
    assert total == pytest.approx(sum(per) / len(per))


def test_score_task_empty():
    assert score_task("color", [], []) == (0.0, [])
    assert score_task("caption", [], []) == (0.0, [])
