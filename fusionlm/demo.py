"""The main job: train the default model (Method A) on the synthetic world, evaluate, report.

The report: ``report.json`` (``evaluate.harness.write_results``) and ``report.md``: the score table,
a picture grid of test examples per task (``examples.png``, ``evaluate.grid``), the loss plot
(``run/loss.png``) and the wall time."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import load_model
from .config import load_recipe
from .data.batching.batches import ImageSpec
from .data.sources import build_source
from .evaluate.grid import example_grid
from .evaluate.harness import EVAL_TASKS, evaluate, markdown_table, write_results
from .evaluate.results import TaskResult
from .recipe import trained_tasks
from .train.loop import train
from .train.report import read_metrics


def run_demo(out: str | Path, overrides: list[str] | None = None, *, recipe: str = "demo") -> dict:
    out = Path(out)
    started = time.perf_counter()
    config = load_recipe(recipe, overrides)
    print(f"fusionlm demo: training recipe '{recipe}' ({config.model.fusion.kind}) into {out / 'run'}")
    train(config, out / "run")
    trained = time.perf_counter() - started

    model, tokenizer, config = load_model(out / "run", device="auto")
    source = build_source(config.data)
    spec = ImageSpec.for_model(model, config, root=source.root)
    print(f"evaluating on the test split ({config.train.eval_per_task} samples per task)")
    tasks = [t for t in EVAL_TASKS if t in trained_tasks(config, source)]  # what the recipe taught
    results = evaluate(model, tokenizer, source, spec, split="test", per_task=config.train.eval_per_task,
                       batch_size=config.train.eval_batch_size, tasks=tasks, progress=print)
    wall = time.perf_counter() - started

    example = next(r for r in results if r.task == "shape").examples[0]
    sample = source.get("shape", "test", 0)
    image_path = out / "example.png"
    sample.images[0].save(image_path)
    metrics = read_metrics(out / "run" / "metrics.jsonl")
    tok_s = sum(m["tokens"] for m in metrics) / max(1e-9, sum(m["tokens"] / m["tokens_per_s"] for m in metrics if m["tokens_per_s"]))
    extra = {"wall_seconds": round(wall, 1), "train_seconds": round(trained, 1),
             "train_tokens_per_s": round(tok_s, 1), "steps": len(metrics),
             "final_loss": metrics[-1]["loss"] if metrics else None}
    summary = (f"Recipe `{recipe}` ({config.model.fusion.kind}), {extra['steps']} optimizer steps; "
               f"wall time {wall:.0f} s (training {trained:.0f} s, {tok_s:.0f} tokens/s); test split, "
               f"{config.train.eval_per_task} samples per task. Reproduce: `fusionlm demo --out {out}`.")
    write_report(out, results, source, extra, summary)

    print()
    print(markdown_table(results))
    print()
    print(f"wall time {wall:.0f} s (training {trained:.0f} s, {tok_s:.0f} tokens/s)")
    print(f"example: {image_path}; examples per task: {out / 'examples.png'}")
    print(f"  question: {example['question'].replace('<image>', '').strip()}")
    print(f"  answer:   {example['answer']}   (reference: {example['references'][0]})")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return json.loads((out / "report.json").read_text())


def write_report(out: Path, results: list[TaskResult], source, extra: dict, summary: str) -> None:
    """``out/report.json`` (scores, ``extra`` beside them) and ``out/report.md``: the score table,
    ``examples.png`` (drawn here from ``source``), ``run/loss.png`` (when training drew one), ``summary``."""
    write_results(results, out / "report.json", extra=extra)
    example_grid(results, source, out / "examples.png")
    parts = ["![examples](examples.png)"]
    if (out / "run" / "loss.png").is_file():
        parts.append("![loss](run/loss.png)")
    with open(out / "report.md", "a") as fh:
        fh.write("\n" + "\n\n".join([*parts, summary]) + "\n")
