"""What each scale of a next-scale checkpoint has learnt: the teacher-forced code loss per scale on
validation drawings, with their prompts and with the null prompt (how much the prompt tells each
scale).

    python experiments/scale_loss.py runs/var [--samples 64]
"""

from __future__ import annotations

import argparse
import json

import torch

from fusionlm.checkpoint import load_model
from fusionlm.data.batching.batches import ImageSpec, collate
from fusionlm.data.drawing import null_prompt
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.world import World


@torch.no_grad()
def scale_losses(model, prompts: PromptEncoder, samples, pad: int) -> list[float]:
    """The mean code loss (nats) of each scale over ``samples``' drawn pictures, teacher-forced."""
    batch = collate([prompts.sample(s) for s in samples], ["draw"] * len(samples), [], pad)
    ids = model.with_codes(batch.input_ids, batch.drawn)  # (B, T)
    scores = model(ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).code_logits  # (B, T, K)
    n = model.image_tokenizer.grid[1]
    losses = []
    for row in range(len(samples)):
        slots = torch.nonzero(ids[row] >= model.code_offset).squeeze(-1)[:n]  # (n,) the picture's codes
        logp = torch.log_softmax(scores[row, slots - 1].float(), -1)  # (n, K): position i-1 scores code i
        losses.append(-logp.gather(-1, (ids[row, slots] - model.code_offset)[:, None]).squeeze(-1))
    loss = torch.stack(losses)  # (B, n)
    return [round(float(loss[:, a:b].mean()), 3) for a, b in model.image_tokenizer.spans()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    model, tokenizer, config = load_model(args.checkpoint)
    if model.generation.parallel != "by_scale":
        raise SystemExit(f"{args.checkpoint}: not a next-scale model (model.generation.kind: {model.generation.name})")
    model.eval()
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    world = World(config.data.world_image_size, config.data.world_seed)
    samples = [world.sample("draw", "val", i) for i in range(args.samples)]
    out = {"checkpoint": args.checkpoint, "scales": model.image_tokenizer.scales,
           "prompt": scale_losses(model, prompts, samples, tokenizer.pad_token_id),
           "null": scale_losses(model, prompts, [null_prompt(s, config.model.generation.null_prompt) for s in samples],
                                tokenizer.pad_token_id)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
