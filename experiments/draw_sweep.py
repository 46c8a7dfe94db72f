"""How a drawing checkpoint's GenEval moves with the sampling settings: guidance scale x
temperature x top-k, on the same held-out prompts (what the recipes' ``model.generation`` defaults
were chosen from).

    python experiments/draw_sweep.py --checkpoint runs/janus --per-category 20
"""

from __future__ import annotations

import argparse
import itertools
import json

from fusionlm.checkpoint import load_model
from fusionlm.data.batching.batches import ImageSpec
from fusionlm.draw import Sampling
from fusionlm.evaluate.drawing import draw_task
from fusionlm.evaluate.tasks import EvalTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--per-category", type=int, default=20)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.7])
    ap.add_argument("--top-k", type=int, nargs="+", default=[0, 32])
    args = ap.parse_args()
    model, tokenizer, config = load_model(args.checkpoint)
    spec = ImageSpec.for_model(model, config)
    task = EvalTask(name="draw", metric="geneval")
    rows = []
    for cfg, temperature, top_k in itertools.product(args.cfg, args.temperature, args.top_k):
        sampling = Sampling(cfg=cfg, temperature=temperature, top_k=top_k)
        results = {r.task: round(r.score, 3) for r in draw_task(model, tokenizer, task, spec, sampling=sampling,
                                                               per_task=args.per_category, batch_size=60)}
        rows.append({"cfg": cfg, "temperature": temperature, "top_k": top_k, **results})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
