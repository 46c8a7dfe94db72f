"""GenEval against the wall time a picture takes: each drawing checkpoint's held-out prompts drawn
at its defaults (a masked or diffusion one also at other numbers of passes), timed, one checkpoint after another
on the same host.

    python experiments/draw_speed.py runs/showo runs/showo_ar --per-category 50 --steps 4 16 32
    python experiments/draw_speed.py runs/showo runs/showo_ar --per-category 5 --batch-size 1
    python experiments/draw_speed.py runs/var runs/showo runs/showo_ar --per-category 50

Prints one JSON line per (checkpoint, passes): GenEval overall and per category, FD, the seconds
per picture (the drawing alone: batches of ``--batch-size`` prompts, 60 by default, with guidance)
and the decoder passes one picture takes (a masked model: its steps; a next-scale one: its scales;
one code at a time: a prefill, then one cached step per code after the first).
"""

from __future__ import annotations

import argparse
import json
import time

from fusionlm.checkpoint import load_model
from fusionlm.data.batching.batches import ImageSpec
from fusionlm.draw import Sampling, passes
from fusionlm.evaluate import drawing
from fusionlm.evaluate.tasks import EvalTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--per-category", type=int, default=20)
    ap.add_argument("--steps", type=int, nargs="*", default=[], help="a masked or diffusion model: these passes besides its own")
    ap.add_argument("--batch-size", type=int, default=60, help="prompts drawn together (1: one picture's latency)")
    args = ap.parse_args()
    task = EvalTask(name="draw", metric="geneval")
    for run in args.checkpoints:
        model, tokenizer, config = load_model(run)
        spec = ImageSpec.for_model(model, config)
        default = Sampling.of(model.config.generation)
        steps = [default.steps, *[s for s in args.steps if s != default.steps]] if model.generation.uses_steps else [None]
        for s in steps:
            sampling = default if s is None else Sampling.of(model.config.generation, steps=s)
            drawn = 0.0
            draw = drawing.draw

            def timed(*a, **kw):
                nonlocal drawn
                start = time.perf_counter()
                out = draw(*a, **kw)
                drawn += time.perf_counter() - start
                return out

            drawing.draw = timed  # only the drawing is timed, not the checks, the ceiling or the FD
            try:
                results = drawing.draw_task(model, tokenizer, task, spec, sampling=sampling,
                                            per_task=args.per_category, batch_size=args.batch_size)
            finally:
                drawing.draw = draw
            n = results[0].n
            print(json.dumps({"checkpoint": run, "design": model.generation.name, "passes": passes(model, sampling),
                              "batch_size": args.batch_size,
                              "seconds_per_picture": round(drawn / n, 4),
                              **{r.task: round(r.score, 3) for r in results}}), flush=True)


if __name__ == "__main__":
    main()
