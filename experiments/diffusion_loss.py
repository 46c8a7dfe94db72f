"""What a diffusion checkpoint has learnt: its flow-matching loss (MSE of the velocity per patch) on
validation drawings at a few noise levels, with their prompts and with the null prompt (how much
the prompt tells it at each level).

    python experiments/diffusion_loss.py runs/transfusion [--samples 64] [--levels 0.1 0.3 0.5 0.7 0.9]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from fusionlm.checkpoint import load_model
from fusionlm.data.batching.batches import ImageSpec, collate
from fusionlm.data.drawing import null_prompt
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.world import World


@torch.no_grad()
def level_loss(model, prompts: PromptEncoder, samples, pad: int, level: float) -> float:
    """The mean velocity MSE per patch over ``samples``' pictures, each noised to ``level`` (the noise
    itself from each sample's index, the same with and without the prompt)."""
    rows = [prompts.sample(s, rng=np.random.default_rng(i)) for i, s in enumerate(samples)]
    batch = collate(rows, ["draw"] * len(rows), [], pad)
    times = torch.full((len(batch.drawn),), level)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                labels=batch.labels, drawn=batch.drawn, noise=batch.noise, times=times)
    return round(float(out.loss_parts["image_loss"] / out.loss_parts["image_targets"]), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    args = ap.parse_args()
    model, tokenizer, config = load_model(args.checkpoint)
    if not model.generation.noised:
        raise SystemExit(f"{args.checkpoint}: not a diffusion model (model.generation.kind: {model.generation.name})")
    model.eval()
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    world = World(config.data.world_image_size, config.data.world_seed)
    samples = [world.sample("draw", "val", i) for i in range(args.samples)]
    nulls = [null_prompt(s, config.model.generation.null_prompt) for s in samples]
    for level in args.levels:
        print(json.dumps({"checkpoint": args.checkpoint, "level": level,
                          "prompt": level_loss(model, prompts, samples, tokenizer.pad_token_id, level),
                          "null": level_loss(model, prompts, nulls, tokenizer.pad_token_id, level)}), flush=True)


if __name__ == "__main__":
    main()
