"""The experiments' table: one row per run directory under runs/reading (its eval500.json and wall.txt).

    python experiments/reading/table.py [NAME ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fusionlm.evaluate.metrics import table_cell_f1

COLUMNS = [("text", "text"), ("table", "table exact"), ("table_cell_f1", "table cell F1"), ("chart", "chart"),
           ("price", "price"), ("shape", "shape"), ("count", "count"), ("position", "position"),
           ("color", "color"), ("caption", "caption CIDEr-D")]


def row(run: Path) -> str:
    report = json.loads((run / "eval500.json").read_text())
    scores = dict(report["scores"])
    scores.update({k: v for extra in report.get("extra_scores", {}).values() for k, v in extra.items()})
    if "table_cell_f1" not in scores and "table" in report["examples"]:  # a run scored before the metric was shown
        cells = [table_cell_f1(e["answer"], e["references"][0]) for e in report["examples"]["table"]]
        scores["table_cell_f1"] = sum(cells) / len(cells)
    wall = (run / "wall.txt").read_text().split()[2] if (run / "wall.txt").exists() else "?"
    cells = [f"{scores[key]:.3f}" if key in scores else "–" for key, _ in COLUMNS]
    return f"| {run.name} | {wall} | " + " | ".join(cells) + " |"


def main() -> None:
    root = Path("runs/reading")
    names = sys.argv[1:] or sorted(p.name for p in root.iterdir() if (p / "eval500.json").exists())
    print("| run | demo wall s | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |")
    for name in names:
        print(row(root / name))


if __name__ == "__main__":
    main()
