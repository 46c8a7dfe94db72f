"""A next-scale checkpoint's GenEval and FD with VAR's guidance ramp (none on the first scale, cfg
on the last) against the same guidance on every scale, on the same held-out prompts.

    python experiments/var_ramp.py runs/var --per-category 30 --cfg 3 6
"""

from __future__ import annotations

import argparse
import json

from fusionlm import draw
from fusionlm.checkpoint import load_model
from fusionlm.data.batching.batches import ImageSpec
from fusionlm.draw import Sampling
from fusionlm.evaluate.drawing import draw_task
from fusionlm.evaluate.tasks import EvalTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--per-category", type=int, default=30)
    ap.add_argument("--cfg", type=float, nargs="+", default=[3.0, 6.0])
    args = ap.parse_args()
    model, tokenizer, config = load_model(args.checkpoint)
    if model.generation.parallel != "by_scale":
        raise SystemExit(f"{args.checkpoint}: not a next-scale model (model.generation.kind: {model.generation.name})")
    spec = ImageSpec.for_model(model, config)
    try:
        for ramp in (True, False):
            draw.CFG_RAMP = ramp
            for cfg in args.cfg:
                results = draw_task(model, tokenizer, EvalTask(name="draw", metric="geneval"), spec,
                                    per_task=args.per_category, batch_size=60,
                                    sampling=Sampling.of(model.config.generation, cfg=cfg))
                print(json.dumps({"ramp": ramp, "cfg": cfg, **{r.task: round(r.score, 3) for r in results}}), flush=True)
    finally:
        draw.CFG_RAMP = True


if __name__ == "__main__":
    main()
