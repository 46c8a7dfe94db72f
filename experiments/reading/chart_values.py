"""What a model answers to "What is the value of bar X?": right, one of the chart's three digits
(the wrong bar's), or another number. Reads ``fusionlm eval``'s per-example answers of runs of
``run.sh`` (their ``eval500.json``) and re-draws each test chart from its id.

    python experiments/reading/chart_values.py NAME [NAME ...]     # runs/reading/NAME/eval500.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fusionlm.data.world import World
from fusionlm.data.world.render import BAR_LABELS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    world = World(64, 0)  # the demo's world (data.world_image_size, data.world_seed)
    print("| run | tallest right | value right | value: a digit of the chart | of those, the asked bar's |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.names:
        examples = json.loads((Path("runs/reading") / name / "eval500.json").read_text())["examples"]["chart"]
        tallest = [e["score"] for e in examples if "tallest" in e["question"]]
        value = [e for e in examples if "tallest" not in e["question"]]
        shown = right = 0
        for e in value:
            split, task, index = e["id"].split("/")
            digits = [str(v) for v in world.spec(task, split, int(index)).meta["values"]]
            asked = BAR_LABELS.index(e["question"].rstrip("?").split()[-1])
            answer = e["answer"].strip()
            shown += answer in digits
            right += answer == digits[asked]
        print(f"| {name} | {sum(tallest) / len(tallest):.3f} | {right / len(value):.3f} | "
              f"{shown / len(value):.3f} | {right / max(1, shown):.3f} |")


if __name__ == "__main__":
    main()
