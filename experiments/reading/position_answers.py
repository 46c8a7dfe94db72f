"""What a model answers to "Where is the X shape relative to the Y shape?": the table of its
answers against the right ones, and how many of the wrong ones name the right axis (left/right
against above/below). Reads ``fusionlm eval``'s per-example answers (an ``eval500.json``).

    python experiments/reading/position_answers.py FILE.json [FILE.json ...]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

RELATIONS = ("left", "right", "above", "below")
AXIS = {"left": "x", "right": "x", "above": "y", "below": "y"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    print("| eval file | where: right | right axis | answers (right one -> given: n) |")
    print("| --- | ---: | ---: | --- |")
    for file in args.files:
        examples = json.loads(file.read_text())["examples"]["position"]
        where = [e for e in examples if e["question"].split("\n")[-1].startswith("Where")]
        pairs = Counter((e["references"][0], e["answer"]) for e in where)
        right = sum(n for (ref, ans), n in pairs.items() if ref == ans) / len(where)
        axis = sum(n for (ref, ans), n in pairs.items() if AXIS.get(ans) == AXIS[ref]) / len(where)
        given = ", ".join(f"{ref}->{ans}: {n}" for (ref, ans), n in sorted(pairs.items()))
        print(f"| {file} | {right:.3f} | {axis:.3f} | {given} |")


if __name__ == "__main__":
    main()
