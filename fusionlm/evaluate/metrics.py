"""Scores: the rules of the field's benchmarks, each a function of one prediction, and ``METRICS``, the
registry of corpus-level scorers that a task definition names.

The synthetic world's tasks keep their metrics (``metric_for``): exact match for short answers,
CIDEr for captions (pycocoevalcap's scorer), exact match for table -> Markdown after whitespace
normalisation, with the cell F1 reported beside it (``extra_metrics_for``). For real benchmarks:
VQAv2 soft accuracy (``vqa_accuracy``), ANLS for DocVQA / ST-VQA (``anls``), cell-level F1 between
Markdown tables (``table_cell_f1``) and multiple-choice accuracy (``choice_accuracy``).
"""

from __future__ import annotations

import re
from typing import Callable

import Levenshtein
from pycocoevalcap.cider.cider import Cider

from ..registry import Registry

_PUNCT = re.compile(r"[^\w\s|-]")


def normalize(text: str) -> str:
    """Lower case, punctuation dropped (except the table characters | and -), spaces collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in answers))


def normalize_table(text: str) -> str:
    rows = []
    for line in text.strip().splitlines():
        cells = [" ".join(c.split()).lower() for c in line.strip().strip("|").split("|")]
        if all("-" in c and set(c) <= set("-: ") for c in cells):
            cells = ["---"] * len(cells)  # alignment rows differ only in dashes (a row of empty cells is not one)
        rows.append("|".join(cells))
    return "\n".join(rows)


def table_match(prediction: str, answers: list[str]) -> float:
    pred = normalize_table(prediction)
    return float(any(pred == normalize_table(a) for a in answers))


def cider(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D over lower-cased, punctuation-free text: (corpus score, per-sample scores).

    Document frequencies come from the whole reference set, so scores depend on the corpus, as
    in COCO evaluation; compare numbers computed on the same evaluation set only.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return 0.0, []
    res = {i: [normalize(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    score, per = Cider().compute_score(gts, res)
    return float(score), [float(x) for x in per]


# ----------------------------------------------------------------------------- VQAv2 accuracy

# The answer normalisation of the VQAv2 evaluation server (EvalAI), as described by its rules:
# 1. lower case; commas and question marks dropped; "'s" split off as its own word ("man's" ->
#    "man 's"); newlines and tabs become spaces; outer spaces stripped;
# 2. each of the punctuation marks below is deleted where the text has it next to a space
#    ("cat !"), else each occurrence becomes a space ("black/white" -> "black white");
# 3. a period is deleted unless a digit follows it, so numbers keep theirs ("3.5", but "yes." -> "yes");
# 4. per word: number words zero..ten (and "none") become digits, the articles a/an/the are
#    dropped, and contractions written without one of their apostrophes get it back.
_VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
# The contractions the benchmark restores, each from the spellings that miss one of its apostrophes
# ("couldnt've", "couldn'tve" -> "couldn't've"; not "couldntve"). Left alone, as by the benchmark:
# "its", "well", "were", "ill", "id", "wed", "shed", "hell", "shell" (real words), "lets", "shes",
# and "im"/"ive" (the benchmark's table spells those keys with a capital I, which never matches a
# lower-cased word). Spellings with "'s" in them never reach the table: step 1 has split them.
_VQA_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're
they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've
""".split()


def _one_apostrophe_dropped(word: str) -> list[str]:
    return [word[:i] + word[i + 1:] for i, ch in enumerate(word) if ch == "'"]


_VQA_CONTRACTIONS = {variant: word for word in _VQA_CONTRACTED for variant in _one_apostrophe_dropped(word)}
_VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the benchmark's table has this entry and no "somebodyd"
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def vqa_normalize(answer: str) -> str:
    """An answer as the VQAv2 evaluation (EvalAI) compares it; the rules are listed above."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _VQA_PUNCTUATION:
        next_to_space = mark + " " in text or " " + mark in text  # decided on the text before this step
        out = out.replace(mark, "" if next_to_space else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)  # sic: the benchmark's code stops after 32
    words = [_VQA_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 soft accuracy (Antol et al. 2015; Goyal et al. 2017) after ``vqa_normalize``.

    With the benchmark's 10 human answers: the mean over the 10 subsets that leave one answer out of
    min(1, #answers in the subset equal to the prediction / 3); so 4+ matching humans give 1.0,
    3 give 0.9, 2 give 0.6, 1 gives 0.3.

    Other counts (our choice): the same leave-one-out mean over the n given answers, with full
    credit in a subset at min(3, n - 1) matches instead of 3; for n >= 4 that is the formula above
    unchanged. Below 4 the plain formula could never give 1.0 (n = 1 would always score 0: the only
    subset is empty), so: 3 answers need both others, 2 answers need the other one (a prediction
    equal to both scores 1.0, to one of them 0.5), and a single answer is an exact match after
    normalisation. No answers: 0.
    """
    if not answers:
        return 0.0
    pred = vqa_normalize(prediction)
    hits = [vqa_normalize(a) == pred for a in answers]
    n, matches = len(hits), sum(hits)
    if n == 1:
        return float(matches)
    full = min(3, n - 1)
    return sum(min(full, matches - hit) for hit in hits) / (full * n)  # one division: 2 of 10 is 0.6 exactly


# ----------------------------------------------------------------------------- ANLS

def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (ST-VQA, Biten et al. 2019; DocVQA).

    The max over the answers of 1 - NL if NL < ``threshold`` else 0, where NL is the Levenshtein
    distance over the longer string's length, both strings lower-cased, stripped and with inner
    runs of spaces collapsed to one (as the benchmarks' scripts do). No answers: 0.
    """
    pred = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        ref = _anls_text(answer)
        longest = max(len(pred), len(ref))
        nl = Levenshtein.distance(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ----------------------------------------------------------------------------- table cell F1

_CELL_BORDER = re.compile(r"(?<!\\)\|")
_ALIGNMENT_CELL = re.compile(r":?-+:?")


def markdown_rows(text: str) -> list[list[str]]:
    """The rows of a Markdown table, header first, each a list of cell texts (lower-cased, spaces
    collapsed; ``\\|`` is a literal pipe). Lines without a ``|`` (prose around the table) are
    skipped, and so is the first alignment row (``| --- | :-: |``); outer pipes are optional."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if "|" not in line.replace("\\|", ""):
            continue
        if line.startswith("|"):
            line = line[1:]
        if line.endswith("|") and not line.endswith("\\|"):
            line = line[:-1]
        rows.append([" ".join(c.replace("\\|", "|").split()).lower() for c in _CELL_BORDER.split(line)])
    for i, row in enumerate(rows):
        if all(_ALIGNMENT_CELL.fullmatch(c.replace(" ", "")) for c in row):
            del rows[i]
            break
    return rows


def _matched_cells(pred: list[list[str]], ref: list[list[str]]) -> int:
    """The most cells that agree (same column, same text) under an order-preserving one-to-one
    pairing of predicted with reference rows (a diff-style alignment, by dynamic programming)."""
    above = [0] * (len(ref) + 1)
    for prow in pred:
        here = [0] * (len(ref) + 1)
        for j, rrow in enumerate(ref):
            same = sum(a == b for a, b in zip(prow, rrow))
            here[j + 1] = max(above[j + 1], here[j], above[j] + same)
        above = here
    return above[-1]


def table_cell_f1(prediction: str, reference: str) -> float:
    """Cell-level F1 between a predicted and a reference Markdown table (table -> Markdown tasks).

    Benchmarks of table recognition score cells rather than whole tables; there is no single
    standard, so our convention: a cell is (row, column, text), header row included; columns are
    compared by position, and rows are paired in order by content (the alignment that agrees on the
    most cells, like a diff) rather than by index, so a missed or extra row costs its own cells and
    not every row after it. Precision = agreeing cells / predicted cells, recall = agreeing cells /
    reference cells. A prediction without a table (no line with a ``|``) scores 0, as does an empty
    reference.
    """
    pred, ref = markdown_rows(prediction), markdown_rows(reference)
    n_pred, n_ref = sum(map(len, pred)), sum(map(len, ref))
    if not n_pred or not n_ref:
        return 0.0
    agree = _matched_cells(pred, ref)
    return 2 * agree / (n_pred + n_ref)  # = 2PR / (P + R)


# ----------------------------------------------------------------------------- multiple choice

_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*",
                            re.IGNORECASE)
_LETTER = re.compile(r"^([(\[])?([A-Za-z])([)\]])?([.:,)]?)(.*)$", re.DOTALL)


def _letter_index(letter: str, choices: list[str]) -> int | None:
    index = ord(letter.upper()) - ord("A")
    return index if 0 <= index < len(choices) else None


def _choice_by_text(text: str, choices: list[str]) -> int | None:
    text = normalize(text)
    return next((i for i, c in enumerate(choices) if text and normalize(c) == text), None)


def picked_choice(prediction: str, choices: list[str]) -> int | None:
    """The index of the option a free-form answer picks, or None.

    Accepted: the option's text ("cat", "Cat."), or its letter, alone or marked: "B", "b", "(B)",
    "[B]", "B.", "B)", "B:", "Answer: B", "The answer is (B).", "B. cat" (the letter wins if the
    text that follows names another option), "B cat" (a bare capital followed by text only when
    the text is that option's: "A cat" is a sentence when option A is not "cat").
    """
    text = prediction.strip().strip("*").strip()
    bare = _ANSWER_PREFIX.sub("", text, count=1).strip().strip("*").strip()  # "Answer: B" -> "B"
    for candidate in (text, bare):
        index = _choice_by_text(candidate, choices)
        if index is not None:
            return index
    m = _LETTER.match(bare)
    if not m:
        return None
    opened, letter, closed, mark, rest = m.groups()
    index = _letter_index(letter, choices)
    if index is None or (opened and not closed):
        return None
    rest = rest.strip()
    if not rest or closed or mark:
        return index
    return index if letter.isupper() and _choice_by_text(rest, choices) == index else None


def choice_accuracy(prediction: str, choices: list[str], answer: str | int) -> float:
    """Multiple-choice accuracy (MMMU, ScienceQA, MMBench, SEED-Bench style): 1.0 if the prediction
    picks the right option (``picked_choice`` lists the forms read), else 0.0. ``answer`` is the
    right option's letter ("B"), its text, or its 0-based index."""
    if isinstance(answer, int):
        right = answer if 0 <= answer < len(choices) else None
    else:
        marked = re.fullmatch(r"\(?([A-Za-z])\)?\.?", answer.strip())
        right = _letter_index(marked.group(1), choices) if marked else _choice_by_text(answer, choices)
    if right is None:
        raise ValueError(f"answer {answer!r} is not one of the {len(choices)} options {choices!r}")
    return float(picked_choice(prediction, choices) == right)


# ----------------------------------------------------------------------------- the registry

MetricFn = Callable[[list[str], list[list[str]]], tuple[float, list[float]]]
METRICS: Registry[MetricFn] = Registry("metric", "metric")
"""Metric name -> ``fn(predictions, references) -> (score, per-sample scores)``; ``references[i]``
holds sample i's reference answers (for ``choice_accuracy``: ``[answer_letter, *options]``). The
score is the mean of the per-sample scores, except CIDEr's (corpus-level). ``METRICS.get(name)``
raises ConfigError naming the known metrics."""


def _mean_of(one: Callable[[str, list[str]], float]) -> MetricFn:
    def score(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
        per = [float(one(p, list(r))) for p, r in zip(predictions, references)]
        return (sum(per) / len(per) if per else 0.0), per

    score.__doc__ = f"Mean over samples of {one.__name__}."
    return score


def _best_table_f1(prediction: str, references: list[str]) -> float:
    return max((table_cell_f1(prediction, r) for r in references), default=0.0)


def _choice(prediction: str, reference: list[str]) -> float:
    if not reference:
        raise ValueError("a multiple-choice reference is [answer_letter, *options]; got []")
    return choice_accuracy(prediction, reference[1:], reference[0])


for _name, _one in [("exact_match", exact_match), ("table_exact_match", table_match),
                    ("vqa_accuracy", vqa_accuracy), ("anls", anls), ("table_cell_f1", _best_table_f1),
                    ("choice_accuracy", _choice)]:
    METRICS.register(_name)(_mean_of(_one))
METRICS.register("cider")(cider)

# The synthetic world's tasks and their metrics; any other task of the world: exact match.
TASK_METRICS = {"caption": "cider", "table": "table_exact_match", "draw": "geneval"}
# Scores reported beside the task's own, on the same answers: a table that is one cell off scores 0
# by exact match, and its cell F1 says how far off it is.
TASK_EXTRA_METRICS = {"table": ("table_cell_f1",)}
GENEVAL = "geneval"  # a drawing task: its pictures scored by ``evaluate.geneval``, not its text


def metric_for(task: str) -> str:
    return TASK_METRICS.get(task, "exact_match")


def extra_metrics_for(task: str) -> list[str]:
    """The metrics a world task reports besides ``metric_for(task)`` (none for most)."""
    return list(TASK_EXTRA_METRICS.get(task, ()))


def score_task(task: str, predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """(task score, per-sample scores); CIDEr's per-sample values are that sample's contribution."""
    return METRICS.get(metric_for(task))(predictions, references)
