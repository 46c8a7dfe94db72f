"""How much a drawing checkpoint uses its prompt: the mean code loss (nats per code) of held-out
text-to-image samples with their prompt and with the null prompt that guidance samples against.

    python experiments/draw_condition.py --checkpoint runs/janus
"""

from __future__ import annotations

import argparse

import torch

from fusionlm.checkpoint import load_model
from fusionlm.data.batching.batches import ImageSpec, collate
from fusionlm.data.drawing import null_prompt
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.world import World


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    model, tokenizer, config = load_model(args.checkpoint)
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    world = World(config.data.world_image_size, config.data.world_seed)
    samples = [world.sample("draw", "test", i) for i in range(args.n)]
    for name, asked in (("with the prompt", samples), ("with the null prompt", [null_prompt(s) for s in samples])):
        done = [prompts.sample(s) for s in asked]
        batch = collate([d.encoded for d in done], [], ["draw"] * len(done), [], tokenizer.pad_token_id,
                        drawn=[p for d in done for p in d.drawn])
        with torch.no_grad():  # the code targets only (text weighted 0), summed
            out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, drawn=batch.drawn,
                        loss_weights=(0.0, 1.0), loss_reduction="sum")
        codes = int((batch.labels == model.ids.code).sum())
        print(f"{name}: {float(out.loss) / codes:.3f} nats per code ({codes} codes)")


if __name__ == "__main__":
    main()
