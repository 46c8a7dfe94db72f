"""Method B decoding: time per new token as the image memory grows from 64 to 2,048 tokens. Image
keys/values are projected once per request, so a decoding step should cost about the same
whatever the number of image tokens; prefill cost grows with them.

    python benchmarks/cross_attention_decode.py
"""

from __future__ import annotations

import statistics
import time

import torch

from common import machine
from fusionlm.checkpoint import build_model
from fusionlm.config import RecipeConfig, validate
from fusionlm.data.pixels.processing import ImageBatch
from fusionlm.data.world import World
from fusionlm.data.tokenizer import train_tokenizer
from fusionlm.runtime import StaticDecoder

NEW = 64
REPEATS = 9


def main() -> None:
    config = RecipeConfig()
    enc, llm = config.model.encoder, config.model.llm
    enc.image_size, enc.patch_size = 64, 8  # 64 tokens per image
    llm.hidden_size, llm.intermediate_size, llm.num_layers, llm.max_length = 256, 1024, 4, 512
    config.model.fusion.kind = "cross_attention"
    validate(config)
    world = World(64, 0)
    tokenizer = train_tokenizer([world.sample(t, "train", i).all_text() for t in ("color", "caption") for i in range(50)],
                                400)
    torch.manual_seed(0)
    model = build_model(config, tokenizer).eval()
    torch.set_grad_enabled(False)
    print(f"machine: {machine()}; decode steps: {NEW}")
    print("| image tokens | images | prefill ms | decode ms / token | compiled decode ms / token |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n_images in (1, 2, 4, 8, 16, 32):
        ids = torch.tensor([[model.ids.image] * n_images + [40, 41, 42, 43]])  # (1, T): markers, then text
        mask = torch.ones_like(ids)
        pixels = ImageBatch.of(torch.randn(n_images, 3, 64, 64), model.encoder.grid)
        times = {}
        for compile in (False, True):
            runs = []
            for _ in range(REPEATS + 1):  # the first warms up (and compiles); the median of the rest
                t0 = time.perf_counter()
                ctx = model.encode_images(pixels, ids)
                decoder = StaticDecoder(model, 1, ids.shape[1] + NEW + 1, compile=compile)
                logits = decoder.prefill(ids, mask, ctx)
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(NEW):
                    logits = decoder.step(logits.argmax(-1))
                runs.append((prefill, (time.perf_counter() - t0) / NEW))
            times[compile] = [statistics.median(x) for x in zip(*runs[1:])]
        (prefill, eager), (_, compiled) = times[False], times[True]
        print(f"| {n_images * model.encoder.num_tokens} | {n_images} | {prefill * 1000:.1f} | {eager * 1000:.2f} | "
              f"{compiled * 1000:.2f} |")

if __name__ == "__main__":
    main()
