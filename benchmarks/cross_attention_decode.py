"""Method B decoding: time per new token as the image memory grows from 64 to 2,048 tokens. Image
keys/values are projected once per request, so a decoding step should cost about the same
whatever the number of image tokens; prefill cost grows with them.

    python benchmarks/cross_attention_decode.py
"""

from __future__ import annotations

import time

import torch

from common import machine
from fusionlm.checkpoint import build_model
from fusionlm.config import RecipeConfig, validate
from fusionlm.data.processing import ImageBatch
from fusionlm.data.synthetic import World
from fusionlm.data.tokenizer import train_tokenizer

NEW = 32


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
    print(f"machine: {machine()}; decode steps: {NEW}")
    print("| image tokens | images | prefill ms | decode ms / token |")
    print("| ---: | ---: | ---: | ---: |")
    for n_images in (1, 2, 4, 8, 16, 32):
        ids = torch.tensor([[model.ids.image] * n_images + [40, 41, 42, 43]])  # (1, T): markers, then text
        pixels = ImageBatch.of(torch.randn(n_images, 3, 64, 64), model.encoder.grid)
        with torch.no_grad():
            for _ in range(2):  # warm up, then time the second
                t0 = time.perf_counter()
                ctx = model.encode_images(pixels, ids)
                out = model(ids, images=ctx, use_cache=True)
                prefill = time.perf_counter() - t0
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for step in range(NEW):
                    out = model(tok, images=ctx, past_key_values=past, use_cache=True, query_start=ids.shape[1] + step)
                    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                decode = (time.perf_counter() - t0) / NEW
        print(f"| {n_images * model.encoder.num_tokens} | {n_images} | {prefill * 1000:.1f} | {decode * 1000:.2f} |")


if __name__ == "__main__":
    main()
