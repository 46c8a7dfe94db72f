"""Train shipped recipes on the synthetic world and score each on the test split.

    python experiments/design_space.py OUT_DIR RECIPE [RECIPE ...] [--per-task N] [--set KEY=VALUE ...]

Appends one JSON line per recipe to OUT_DIR/results.jsonl (scores per task it trains on, wall
seconds of training and evaluation, the device), so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fusionlm.checkpoint import load_model
from fusionlm.config import load_recipe
from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.data.sources import build_source
from fusionlm.device import resolve_device
from fusionlm.evaluate.harness import EVAL_TASKS, evaluate
from fusionlm.recipe import trained_tasks
from fusionlm.train.loop import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--per-task", type=int, default=50)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    for name in args.recipes:
        config = load_recipe(name, args.set)
        started = time.perf_counter()
        train(config, out / name, log=lambda *_: None)
        trained = time.perf_counter() - started
        model, tokenizer, config = load_model(out / name, device="auto")
        source = build_source(config.data)
        spec = ImageSpec.for_model(model, config, root=source.root)
        tasks = [t for t in EVAL_TASKS if t in trained_tasks(config, source)]
        results = evaluate(model, tokenizer, source, spec, split="test", per_task=args.per_task, batch_size=50,
                           tasks=tasks)
        row = {"recipe": name, "design": config.model.fusion.kind, "scores": {r.task: r.score for r in results},
               "train_seconds": round(trained, 1), "eval_seconds": round(time.perf_counter() - started - trained, 1),
               "steps": sum(s.steps for s in config.stages), "device": str(device),
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "per_task": args.per_task}
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
