"""Can the demo's ViT learn shape by itself? Train it with a linear head on mean-pooled features.

    python experiments/encoder_probe.py            # prints step, loss, validation accuracy

Used in docs/demo.md: the tower alone separates the three shapes within a few hundred steps, so
the difficulty of learning shape through the LLM is the weak gradient path, not the encoder.
"""

from __future__ import annotations

import argparse

import torch

from fusionlm.config import EncoderConfig
from fusionlm.data.pixels.images import image_to_pixels
from fusionlm.data.world import SHAPES, World
from fusionlm.encoders import build_encoder


def batch(world: World, size: int, split: str, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [world.sample("shape", split, i) for i in range(start, start + n)]
    x = torch.stack([image_to_pixels(s.images[0], size) for s in samples])  # (n, 3, S, S)
    y = torch.tensor([SHAPES.index(s.answers[0]) for s in samples])  # (n,)
    return x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    world = World(64, 0)
    enc = build_encoder(EncoderConfig(kind="siglip", image_size=args.image_size, patch_size=args.patch_size,
                                      hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128))
    head = torch.nn.Linear(enc.out_dim, len(SHAPES))
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], args.lr)
    xv, yv = batch(world, args.image_size, "val", 0, 200)
    for step in range(args.steps + 1):
        x, y = batch(world, args.image_size, "train", step * 32, 32)
        loss = torch.nn.functional.cross_entropy(head(enc(x).mean(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                acc = (head(enc(xv).mean(1)).argmax(-1) == yv).float().mean()
            print(f"step {step:4d}  loss {loss.item():.3f}  val accuracy {acc.item():.2f}", flush=True)


if __name__ == "__main__":
    main()
