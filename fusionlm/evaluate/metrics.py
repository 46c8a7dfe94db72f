"""Scores: exact match for short answers, CIDEr for captions (pycocoevalcap's scorer), exact
match for table -> Markdown after whitespace normalisation."""

from __future__ import annotations

import re

from pycocoevalcap.cider.cider import Cider

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
    if not predictions:
        return 0.0, []
    res = {i: [normalize(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    score, per = Cider().compute_score(gts, res)
    return float(score), [float(x) for x in per]


METRICS = {"caption": "cider", "table": "table_exact_match"}


def metric_for(task: str) -> str:
    return METRICS.get(task, "exact_match")


def score_task(task: str, predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """(task score, per-sample scores); CIDEr's per-sample values are that sample's contribution."""
    metric = metric_for(task)
    if metric == "cider":
        return cider(predictions, references)
    fn = table_match if metric == "table_exact_match" else exact_match
    per = [fn(p, r) for p, r in zip(predictions, references)]
    return (sum(per) / len(per) if per else 0.0), per
