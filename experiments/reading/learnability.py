"""Can the demo's encoder learn to tell the 106 words apart, and how fast? The demo's tower (SigLIP
layout, 64 px, 16 px patches, width 64, 2 layers) with its linear patch embedding or with the conv
stem, trained alone by the contrastive loss on batches of 64 word images only: each image's mean
token, through a linear map, against a fixed random vector per word (what the demo's frozen LLM
embeddings are to its contrastive stage). Scored every 200 steps on 500 test images by the nearest
word vector. Images come from a pool of train-split samples rendered once (``--pool``).

    python experiments/reading/learnability.py [--steps 1000] [--pool 40000] [--stem patch conv]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fusionlm.config import load_recipe
from fusionlm.data.pixels.processing import ImageBatch, ImageSpec
from fusionlm.data.world.vocabulary import WORDS
from fusionlm.data.world.world import World
from fusionlm.encoders import build_encoder


def word_images(spec: ImageSpec, world: World, split: str, n: int) -> tuple[list, torch.Tensor]:
    inputs, truth = [], []
    for i in range(n):
        sample = world.sample("text", split, i)
        inputs.append(spec.process(sample.images[0]))
        truth.append(WORDS.index(sample.answers[0]))
    return inputs, torch.tensor(truth)


def run(stem: str, steps: int, pool: tuple[list, torch.Tensor], test: tuple[list, torch.Tensor]) -> None:
    torch.manual_seed(0)
    config = load_recipe("demo", [f"model.encoder.stem={stem}"])
    encoder = build_encoder(config.model.encoder)
    words = torch.randn(len(WORDS), 128)  # (106, 128): a fixed vector per word
    head = torch.nn.Linear(encoder.out_dim, 128)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-3, weight_decay=0.0)
    vectors = lambda inputs: F.normalize(head(encoder(ImageBatch.collate(inputs)).mean(1)), dim=-1)  # noqa: E731
    images, truth = pool
    started = time.perf_counter()
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(images), (64,))
        logits = vectors([images[i] for i in pick]) @ F.normalize(words[truth[pick]], dim=-1).T / 0.07  # (64, 64)
        labels = torch.arange(64)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            with torch.no_grad():
                nearest = (vectors(test[0]) @ F.normalize(words, dim=-1).T).argmax(1)
            accuracy = (nearest == test[1]).float().mean().item()
            print(f"stem {stem:5s} step {step:5d}: test word retrieval {accuracy:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=40000, help="train-split word images rendered once")
    parser.add_argument("--stem", nargs="+", default=["patch", "conv"])
    args = parser.parse_args()
    config = load_recipe("demo")
    encoder = build_encoder(config.model.encoder)  # the letterbox and grid a demo model's images get
    spec = ImageSpec(size=encoder.image_size, mean=encoder.mean, std=encoder.std, grid=encoder.grid)
    world = World(config.data.world_image_size, config.data.world_seed)
    pool, test = word_images(spec, world, "train", args.pool), word_images(spec, world, "test", 500)
    for stem in args.stem:
        run(stem, args.steps, pool, test)


if __name__ == "__main__":
    main()
