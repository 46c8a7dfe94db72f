"""Can the demo's LLM learn the position question's hop at all, with the picture given as text?

The demo's LLM (Llama, 128 wide, 4 layers, from scratch), trained as the demo's stages train
(the training loop's AdamW and schedule: lr 2e-3, 50 warm-up steps, cosine; 32 a batch), on the position question with the scene
written as tokens instead of an image, two ways:

- ``grid``: the 4 x 4 cells of the 64-pixel picture as 16 tokens in row-major order (a cell
  token names its colour and shape, or empty), the way the image tokens stand: where a shape is
  follows only from the token's place in the sequence (RoPE);
- ``coords``: each shape as colour, shape, column, row tokens: where it is is written out.

Then "where is the {colour} shape relative to the {colour} one?" -> left / right / above / below.
Prints held-out accuracy every 250 steps. If the grid version learns, the LLM can make the hop
and what the image tokens hand it is what is missing; if not, the hop is beyond this LLM in
this budget, whatever the encoder does.

    .venv/bin/python experiments/reading/text_binding.py [--steps 1000] [--layout grid|coords] [--lr 2e-3] [--seed 0] [--layers 4]
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusionlm.config import StageConfig
from fusionlm.train.schedule import lr_lambda

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
RELS = ["left", "right", "above", "below"]
WORDS = ["<pad>", "<empty>", "where", "is", "the", "shape", "relative", "to", "one", "?", "<sep>", *COLORS, *SHAPES,
         *RELS, *(f"{c}_{s}" for c in COLORS for s in SHAPES), *(f"col{i}" for i in range(4)),
         *(f"row{i}" for i in range(4))]
VOCAB = {w: i for i, w in enumerate(WORDS)}


def sample(rng: random.Random, layout: str) -> tuple[list[int], int]:
    """A scene of two shapes apart along one axis, its question and the answer's id."""
    horizontal = rng.random() < 0.5
    a, b = rng.choice([(0, 2), (0, 3), (1, 3)])  # main-axis cells, two or more apart
    cross = [rng.randint(1, 2), rng.randint(1, 2)]  # at most one apart across: the axis is never in doubt
    colors = rng.sample(COLORS, 2)  # colors[0] at the smaller coordinate
    shapes = [rng.choice(SHAPES) for _ in range(2)]
    cells = [(m, o) if horizontal else (o, m) for m, o in zip((a, b), cross)]  # (col, row)
    if rng.random() < 0.5:
        target, ref, rel = colors[0], colors[1], "left" if horizontal else "above"
    else:
        target, ref, rel = colors[1], colors[0], "right" if horizontal else "below"
    if layout == "grid":
        grid = ["<empty>"] * 16
        for (col, row), c, s in zip(cells, colors, shapes):
            grid[row * 4 + col] = f"{c}_{s}"
        scene = grid
    else:
        order = rng.sample(range(2), 2)
        scene = [w for i in order for w in (colors[i], shapes[i], f"col{cells[i][0]}", f"row{cells[i][1]}")]
    words = [*scene, "<sep>", "where", "is", "the", target, "shape", "relative", "to", "the", ref, "one", "?"]
    return [VOCAB[w] for w in words], VOCAB[rel]


def batch(rng: random.Random, layout: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [sample(rng, layout) for _ in range(n)]
    return torch.tensor([r for r, _ in rows]), torch.tensor([a for _, a in rows])  # (B, T), (B,)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layout", choices=["grid", "coords"], default="grid")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=384, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    stage = StageConfig(name="position", steps=args.steps, lr=args.lr, warmup_steps=50)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage))  # the training loop's schedule
    rng, held = random.Random(args.seed), random.Random(-1)
    test_ids, test_answers = batch(held, args.layout, 1000)
    for step in range(1, args.steps + 1):
        ids, answers = batch(rng, args.layout, 32)
        logits = model(ids).logits[:, -1]  # (B, V): the answer follows the question
        loss = torch.nn.functional.cross_entropy(logits, answers)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # train.grad_clip's default
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            with torch.no_grad():
                acc = (model(test_ids).logits[:, -1].argmax(-1) == test_answers).float().mean().item()
            print(f"{args.layout} step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
