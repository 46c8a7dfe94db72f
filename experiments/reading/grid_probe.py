"""Where the image tokens' positions go: a linear probe (least squares, one-hot target) from each
image token to its cell of the patch grid, on the encoder's outputs and on the connector's (what
the LLM reads), fitted on 400 position-task images of the train split and scored on 200 more;
"background" tokens are those of an all-white patch (their content is the same everywhere, so only
a position embedding can tell them apart).

    python experiments/reading/grid_probe.py CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fusionlm.checkpoint import load_model
from fusionlm.data.pixels.images import to_pixels
from fusionlm.data.pixels.processing import ImageBatch
from fusionlm.data.world import World


def probe(features: torch.Tensor, white: np.ndarray, fit: int) -> tuple[float, float, float]:
    """Accuracy of the probe on the held-out images: all tokens, background, with a shape."""
    I, N, D = features.shape
    X = np.c_[features.reshape(I * N, D).numpy(), np.ones(I * N)]  # (I*N, D+1)
    cell = np.tile(np.arange(N), I)  # (I*N,)
    W = np.linalg.lstsq(X[: fit * N], np.eye(N)[cell[: fit * N]], rcond=None)[0]  # (D+1, N)
    hit = (np.argmax(X @ W, 1) == cell)[fit * N:]
    bg = white[fit * N:]
    return hit.mean(), hit[bg].mean(), hit[~bg].mean()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    print("| checkpoint | features | all tokens | background | with a shape |")
    print("| --- | --- | ---: | ---: | ---: |")
    for path in args.checkpoints:
        model, _, config = load_model(path)
        model.eval()
        size, grid = model.encoder.image_size, model.encoder.grid
        world = World(config.data.world_image_size, config.data.world_seed)
        images = [world.sample("position", "train", i).images[0] for i in range(600)]
        pixels = torch.stack([to_pixels(im, size, mean=model.encoder.mean, std=model.encoder.std) for im in images])
        p = size // grid[0]
        patches = pixels.reshape(len(images), 3, grid[0], p, grid[1], p).permute(0, 2, 4, 1, 3, 5)
        white = (patches.reshape(len(images) * grid[0] * grid[1], -1) > 0.99).all(1).numpy()  # (I*N,)
        batch = ImageBatch.of(pixels, grid)
        with torch.no_grad():
            for name, features in (("encoder", model.encoder(batch)), ("connector", model.image_features(batch))):
                acc = probe(features, white, fit=400)
                print(f"| {path} | {name} | " + " | ".join(f"{a:.3f}" for a in acc) + " |")


if __name__ == "__main__":
    main()
