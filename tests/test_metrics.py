"""Scores: exact match after normalisation, table match, and CIDEr against pycocoevalcap's own scorer;
VQAv2 accuracy, ANLS, table cell F1 and multiple-choice accuracy against hand-computed cases and,
where one is installed, a maintained implementation; the METRICS registry."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from pycocoevalcap.cider.cider import Cider

from fusionlm.data.world import table_markdown
from fusionlm.errors import ConfigError
from fusionlm.evaluate.metrics import (METRICS, anls, choice_accuracy, cider, exact_match, markdown_rows, metric_for,
                                       normalize, picked_choice, score_task, table_cell_f1, table_match,
                                       vqa_accuracy, vqa_normalize)


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


def test_score_task_keeps_the_world_metrics():
    assert {t: metric_for(t) for t in ("caption", "table", "color", "count", "text", "chart", "motion")} == {
        "caption": "cider", "table": "table_exact_match", "color": "exact_match", "count": "exact_match",
        "text": "exact_match", "chart": "exact_match", "motion": "exact_match"}


# ----------------------------------------------------------------------------- VQAv2 accuracy

def ten(matching: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize("matching, expected", [
    # Leave-one-out over 10 humans: subset i scores min(1, matches among the other 9 / 3).
    (10, 1.0),
    (4, 1.0),  # leaving a match out still leaves 3 -> every subset 1
    (3, 0.9),  # 3 subsets leave a match out (2/3 each), 7 keep all 3 (1 each): (3*2/3 + 7)/10 = 9/10
    (2, 0.6),  # 2 subsets leave a match out (1/3 each), 8 keep both (2/3 each): (2/3 + 16/3)/10 = 18/30
    (1, 0.3),  # 1 subset leaves it out (0), 9 keep it (1/3 each): 3/10
    (0, 0.0),
])
def test_vqa_accuracy_leave_one_out(matching, expected):
    assert vqa_accuracy("2", ten(matching)) == expected  # exact: the rule divides once


@pytest.mark.parametrize("prediction, answer", [
    ("Two", "2"),
    ("two", "2"),
    ("ten", "10"),
    ("none", "0"),
    ("the cat.", "cat"),
    ("A cat", "cat"),
    ("an apple", "apple"),
    ("yes.", "yes"),
    ("Yes!", "yes"),
    ("YES", "yes"),
    ("3.5", "3.5"),  # a period before a digit stays...
    ("1,000", "1000"),  # commas go
    ("dont", "don't"),
    ("doesnt", "doesn't"),
    ("couldnt've", "couldn't've"),
    ("black/white", "black white"),  # a mark between words becomes a space
    ("black / white", "black white"),  # ...and is deleted where it is next to a space
    ("  red \n", "red"),
    ("what is it?", "what is it"),
])
def test_vqa_normalisation_matches(prediction, answer):
    assert vqa_normalize(prediction) == vqa_normalize(answer)
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0


@pytest.mark.parametrize("prediction, answer", [
    ("3.5", "35"),  # ...so 3.5 is not 35
    ("3.5", "3"),
    ("eleven", "11"),  # number words stop at ten
    ("its", "it's"),  # a real word: not a contraction
    ("cat", "cats"),
    ("", "yes"),
])
def test_vqa_normalisation_keeps_apart(prediction, answer):
    assert vqa_accuracy(prediction, [answer] * 10) == 0.0


def test_vqa_normalize_exact_forms():
    assert vqa_normalize("The Two cats.") == "2 cats"
    assert vqa_normalize("yes.") == "yes"
    assert vqa_normalize("3.5") == "3.5"
    assert vqa_normalize("cat!") == "cat"
    assert vqa_normalize("cat !") == "cat"
    assert vqa_normalize("left-of") == "left of"
    assert vqa_normalize("man's") == "man 's"
    assert vqa_normalize("dont") == "don't"


def test_vqa_accuracy_fewer_references():
    # n >= 4: the formula unchanged; 4 answers, 3 match: leaving a match out leaves 2 (2/3), else 3 (1)
    assert vqa_accuracy("red", ["red", "red", "red", "blue"]) == pytest.approx((3 * 2 / 3 + 1) / 4)
    # below 4, full credit needs min(3, n - 1) of the others: 3 answers, all match -> 1
    assert vqa_accuracy("red", ["red", "red", "red"]) == 1.0
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert vqa_accuracy("red", ["red", "red"]) == 1.0
    assert vqa_accuracy("red", ["red", "blue"]) == 0.5
    assert vqa_accuracy("Red.", ["red"]) == 1.0  # one answer: exact match after normalisation
    assert vqa_accuracy("blue", ["red"]) == 0.0
    assert vqa_accuracy("red", []) == 0.0


def _lmms_eval_processor():
    spec = importlib.util.find_spec("lmms_eval")  # finds without importing the (heavy) package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "_task_utils" / "vqa_eval_metric.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("_lmms_vqa_eval_metric", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.EvalAIAnswerProcessor()


def test_vqa_normalisation_equals_lmms_eval():
    processor = _lmms_eval_processor()
    if processor is None:
        pytest.skip("lmms-eval is not installed (its EvalAIAnswerProcessor is the oracle)")
    words = list(processor.CONTRACTIONS) + list(processor.CONTRACTIONS.values())
    words += "its well were ill id im ive hes shes lets two Ten none eleven a an the".split()
    rng = random.Random(0)
    alphabet = list("abxyz019 .,?!;/[]\"{}()=+\\_-><@`'\n\t:*#%&$") + ["the", "a", "two", "dont", "'s", "3.5"]
    texts = words + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(20000)]
    texts.append("a." * 40)
    assert [vqa_normalize(t) for t in texts] == [processor(t) for t in texts]


# ----------------------------------------------------------------------------- ANLS

@pytest.mark.parametrize("prediction, answers, expected", [
    ("invoice", ["invoice"], 1.0),
    ("  INVOICE ", ["invoice"], 1.0),  # lower-cased and stripped
    ("total  due", ["Total due"], 1.0),  # inner runs of spaces count as one
    ("abcdefghij", ["abcdefghiX"], 0.9),  # one substitution in 10 characters: NL = 0.1
    ("abcdefghi", ["abcdefghij"], 0.9),  # one deletion: 1 / 10
    ("abcdefghij", ["abcdeXXXXX"], 0.0),  # NL = 0.5 is not below the threshold
    ("abcdefghij", ["abcdefXXXX"], 0.6),  # NL = 0.4
    ("cat", ["dog"], 0.0),
    ("abcdefghij", ["zzz", "abcdefghiX", "abcdefghij"], 1.0),  # the best answer counts
    ("", ["abc"], 0.0),
    ("", [""], 1.0),
    ("abc", [], 0.0),
])
def test_anls_hand_computed(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_anls_threshold():
    assert anls("abcdefghij", ["abcdefXXXX"], threshold=0.4) == 0.0
    assert anls("abcdefghij", ["abcdeXXXXX"], threshold=0.6) == pytest.approx(0.5)


def test_anls_equals_the_anls_package():
    from anls import anls_score as oracle  # a test dependency (pyproject's "test" extra): no skip
    rng = random.Random(0)
    alphabet = "abcdeABCDE  19.,-é\t"
    word = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))  # noqa: E731
    cases = 0
    for _ in range(3000):
        answers = [word() for _ in range(rng.randint(1, 3))]
        # some predictions near an answer, so scores above 0 are common
        prediction = word() if rng.random() < 0.4 else "".join(c for c in rng.choice(answers) if rng.random() < 0.85)
        threshold = rng.choice([0.5, 0.5, 0.3, 0.8])
        expected = oracle(prediction=prediction, gold_labels=answers, threshold=threshold)
        assert anls(prediction, answers, threshold) == pytest.approx(expected, abs=1e-12), (prediction, answers)
        cases += expected > 0
    assert cases > 500  # the comparison is not all zeros


# ----------------------------------------------------------------------------- table cell F1

TABLE = "| cat | dog |\n| --- | --- |\n| 1 | 2 |\n| 3 | 4 |"  # 6 cells: header 2 + two rows of 2


def test_markdown_rows():
    assert markdown_rows(TABLE) == [["cat", "dog"], ["1", "2"], ["3", "4"]]
    assert markdown_rows("Cat | Dog\n:-- | --:\n 1 |2") == [["cat", "dog"], ["1", "2"]]
    assert markdown_rows("Here it is:\n|a|b|\n|-|-|\n|x \\| y|-|\nDone.") == [["a", "b"], ["x | y", "-"]]
    assert markdown_rows("no table here") == []


@pytest.mark.parametrize("prediction, expected", [
    (TABLE, 1.0),
    ("|cat|dog|\n|:-:|---|\n|1|2|\n|3|4|", 1.0),  # spacing and alignment rows do not count
    ("| Cat | Dog |\n| --- | --- |\n| 1 | 2 |\n| 3 | 4 |\n", 1.0),
    ("Sure:\n\n" + TABLE + "\n\nHope this helps.", 1.0),  # prose around the table is skipped
    ("| cat | dog |\n| --- | --- |\n| 1 | 2 |\n| 3 | 5 |", 5 / 6),  # one wrong cell: P = R = 5/6
    ("| cat | dog |\n| --- | --- |\n| 1 | 2 |", 0.8),  # last row missing: P = 4/4, R = 4/6 -> 2*4/(4+6)
    ("| cat | dog |\n| --- | --- |\n| 3 | 4 |", 0.8),  # a middle row missing: the rows after it still pair
    ("| 1 | 2 |\n| 3 | 4 |", 0.8),  # no header: the body rows still pair
    ("| cat | dog |\n| --- | --- |\n| 1 | 2 |\n| 9 | 9 |\n| 3 | 4 |", 2 * 6 / (8 + 6)),  # an extra row: P = 6/8
    ("| cat | dog | x |\n| --- | --- | --- |\n| 1 | 2 | x |\n| 3 | 4 | x |", 2 * 6 / (9 + 6)),  # extra column
    ("| dog | cat |\n| --- | --- |\n| 2 | 1 |\n| 4 | 3 |", 0.0),  # columns swapped: no cell in place
    ("| 3 | 4 |\n| 1 | 2 |", 2 * 2 / (4 + 6)),  # rows keep their order: only one of the two pairs
    ("cat dog 1 2 3 4", 0.0),  # no table
    ("", 0.0),
    ("|||\n|", 0.0),
    ("| cat | dog", 2 * 2 / (2 + 6)),  # a broken fragment scores the cells it gets right
])
def test_table_cell_f1_hand_computed(prediction, expected):
    assert table_cell_f1(prediction, TABLE) == pytest.approx(expected)


def test_table_cell_f1_never_crashes_on_garbage():
    rng = random.Random(0)
    pieces = ["|", "---", ":-:", "\n", " ", "cat", "1", "\\|", "\\", "-", ":"]
    for _ in range(500):
        garbage = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert 0.0 <= table_cell_f1(garbage, TABLE) <= 1.0
    assert table_cell_f1(TABLE, "not a table") == 0.0


# ----------------------------------------------------------------------------- multiple choice

OPTIONS = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize("prediction", [
    "B", "b", "(B)", "[B]", "B.", "B)", "B:", "B,", " B ", "**B**", "Answer: B", "answer: b", "The answer is B",
    "The answer is (B).", "Option B", "Correct answer: B", "B. a dog", "(B) a dog", "B a dog",
    "a dog", "A dog", "a dog.", "Answer: a dog",
])
def test_choice_accepts_the_right_forms(prediction):
    assert choice_accuracy(prediction, OPTIONS, "B") == 1.0
    assert picked_choice(prediction, OPTIONS) == 1


@pytest.mark.parametrize("prediction", [
    "C", "(c)", "a bird", "", "E", "Z", "dog", "A dog or a cat", "I think", "B or C?", "(B", "maybe",
])
def test_choice_rejects_other_answers(prediction):
    assert choice_accuracy(prediction, OPTIONS, "B") == 0.0


def test_choice_reads_the_letter_and_the_answer_key():
    assert picked_choice("A cat", OPTIONS) == 0  # the option's text, though it starts like "A"
    assert picked_choice("A fish", OPTIONS) == 3
    assert picked_choice("B. a bird", OPTIONS) == 1  # a marked letter wins over the text after it
    assert picked_choice("D", OPTIONS[:3]) is None  # only 3 options
    assert choice_accuracy("a dog", OPTIONS, "(B)") == 1.0
    assert choice_accuracy("B", OPTIONS, "a dog") == 1.0
    assert choice_accuracy("B", OPTIONS, 1) == 1.0
    with pytest.raises(ValueError):
        choice_accuracy("B", OPTIONS, "E")


# ----------------------------------------------------------------------------- the registry

def test_registry_names_and_unknown_metric():
    assert set(METRICS.names()) == {"exact_match", "vqa_accuracy", "anls", "table_exact_match", "table_cell_f1",
                                    "cider", "choice_accuracy"}
    with pytest.raises(ConfigError) as err:
        METRICS.get("bleu")
    assert "bleu" in str(err.value) and "vqa_accuracy" in str(err.value) and "anls" in str(err.value)


@pytest.mark.parametrize("name, preds, refs, per", [
    ("exact_match", ["Red.", "blue"], [["red"], ["red"]], [1.0, 0.0]),
    ("vqa_accuracy", ["Two", "2", "3"], [ten(4), ten(2), ten(2)], [1.0, 0.6, 1.0]),
    ("anls", ["abcdefghiX", "nope"], [["abcdefghij"], ["abcdefghij"]], [0.9, 0.0]),
    ("table_exact_match", [TABLE, "| cat |"], [[TABLE], [TABLE]], [1.0, 0.0]),
    ("table_cell_f1", ["| cat | dog |\n| --- | --- |\n| 1 | 2 |", "x"], [["| a |", TABLE], [TABLE]], [0.8, 0.0]),
    ("choice_accuracy", ["B", "Answer: (A)", "a fish"], [["B", *OPTIONS], ["C", *OPTIONS], ["D", *OPTIONS]],
     [1.0, 0.0, 1.0]),
])
def test_registry_mean_of_per_sample(name, preds, refs, per):
    score, got = METRICS.get(name)(preds, refs)
    assert got == pytest.approx(per)
    assert score == pytest.approx(sum(per) / len(per))
    assert METRICS.get(name)([], []) == (0.0, [])
    with pytest.raises(ValueError):
        METRICS.get(name)(preds, refs[:-1])


def test_registry_cider_is_corpus_level():
    assert METRICS.get("cider")(PREDS, REFS) == cider(PREDS, REFS)


def test_registry_scores_stay_in_unit_interval():
    rng = random.Random(1)
    words = ["a", "cat", "2", "two", "B", "(C)", "|", "---", "\n", "yes", "the", "."]
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))  # noqa: E731
    refs_of = {
        "choice_accuracy": lambda: [rng.choice("ABCD"), *OPTIONS],
        "vqa_accuracy": lambda: [text() for _ in range(rng.choice([1, 2, 3, 10]))],
    }
    for name in METRICS.names():
        if name == "cider":
            continue
        make = refs_of.get(name, lambda: [text() for _ in range(rng.randint(1, 3))])
        preds = [text() for _ in range(200)]
        refs = [make() for _ in range(200)]
        score, per = METRICS.get(name)(preds, refs)
        assert all(0.0 <= v <= 1.0 for v in per) and 0.0 <= score <= 1.0, name
        assert any(v > 0 for v in per) or name in ("table_exact_match",), name
