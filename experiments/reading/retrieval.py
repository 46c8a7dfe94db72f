"""Does a checkpoint's image side tell the words apart? The contrastive stage's own measure: each of
500 test word images, as the mean of its connector tokens, is matched to the nearest of the 106
words (the mean input embedding of the word's tokens). Chance is 1/106.

    python experiments/reading/retrieval.py CHECKPOINT_OR_RUN_DIR
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fusionlm.checkpoint import load_model
from fusionlm.data.pixels.processing import ImageBatch, ImageSpec
from fusionlm.data.world.vocabulary import WORDS
from fusionlm.data.world.world import World


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=500, help="test images")
    args = parser.parse_args()
    model, tokenizer, config = load_model(args.checkpoint)
    model.eval()
    spec, world = ImageSpec.for_model(model, config), World(config.data.world_image_size, config.data.world_seed)
    table = model.llm.get_input_embeddings().weight
    words = torch.stack([table[tokenizer(w, add_special_tokens=False).input_ids].mean(0) for w in WORDS])  # (106, D)
    inputs, truth = [], []
    for i in range(args.n):
        sample = world.sample("text", "test", i)
        inputs += spec.process_all(sample.images[0])
        truth.append(WORDS.index(sample.answers[0]))
    with torch.no_grad():
        images = model.image_features(ImageBatch.collate(inputs)).mean(1)  # (n, D)
    nearest = (F.normalize(images, dim=-1) @ F.normalize(words, dim=-1).T).argmax(1)  # (n,)
    accuracy = (nearest == torch.tensor(truth)).float().mean().item()
    print(f"{args.checkpoint}: word retrieval {accuracy:.3f} on {args.n} test images (chance {1 / len(WORDS):.3f})")


if __name__ == "__main__":
    main()
