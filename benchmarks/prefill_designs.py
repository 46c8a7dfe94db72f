"""Prefill cost of the three fusion designs as the image tokens grow from 64 to 2,048: Method A
(``unified``: image tokens in the decoder sequence), Method B (``cross_attention``: one marker per
image in the sequence, the image tokens as gated cross-attention memory) and the NVLM-H hybrid (a
64-token thumbnail in the sequence, its tiles as cross-attention memory), against the FLOP model
of ``fusionlm info`` (``fusionlm.info.forward_flops``).

Prefill here excludes the vision encoder and connector: their features are computed once and
reused, as they are the same work in every design. It includes everything after them: Method B's
and the hybrid's projection of image keys/values, the decoder over the whole prompt, the LM head.

    cd benchmarks && python prefill_designs.py
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from common import machine, matmul_flops, print_table, timed
from fusionlm.checkpoint import build_model
from fusionlm.config import RecipeConfig, validate
from fusionlm.data.pixels.processing import ImageBatch, ImageInput
from fusionlm.data.world import World
from fusionlm.data.tokenizer import train_tokenizer
from fusionlm.info import forward_flops

IMAGES = (1, 2, 4, 8, 16, 32)  # encoder inputs of 64 tokens each
TEXT = list(range(40, 56))  # 16 text tokens after the images
DESIGNS = {"A (unified)": "unified", "B (cross_attention)": "cross_attention", "hybrid": "hybrid"}


def build(kind: str, tokenizer):
    config = RecipeConfig()
    enc, llm = config.model.encoder, config.model.llm
    enc.image_size, enc.patch_size = 64, 8  # 64 tokens per image, tile or thumbnail
    llm.hidden_size, llm.intermediate_size, llm.num_layers, llm.max_length = 256, 1024, 4, 2304
    config.model.fusion.kind = kind  # B and hybrid: a gated block before every 2nd layer (fusion.every_n)
    if kind == "hybrid":
        config.model.tiling.max_tiles = max(IMAGES) - 1  # tiles, then the thumbnail
    validate(config)
    torch.manual_seed(0)
    return build_model(config, tokenizer).eval()


def prompt(model, n: int):
    """(input ids (1, T), images) for ``n`` encoder inputs of 64 tokens; None where the design has
    no such prompt (the hybrid needs a thumbnail and at least one tile)."""
    grid = model.encoder.grid
    pixels = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))
    if model.fusion != "hybrid":
        ids = [t for _ in range(n) for t in model.image_layout()] + TEXT
        return torch.tensor([ids]), ImageBatch.of(pixels, grid)
    if n < 2:
        return None
    roles = ["tile"] * (n - 1) + ["thumbnail"]
    ids = model.layout.image_tokens([ImageInput(p, grid, role=r) for p, r in zip(pixels, roles)]) + TEXT
    return torch.tensor([ids]), ImageBatch(pixels, [grid] * n, {}, roles)


def main() -> None:
    world = World(64, 0)
    tokenizer = train_tokenizer([world.sample(t, "train", i).all_text() for t in ("color", "caption") for i in range(50)],
                                400)
    models = {name: build(kind, tokenizer) for name, kind in DESIGNS.items()}
    peak = matmul_flops()
    rows, first = [], {}
    for n in IMAGES:
        base = None
        for name, model in models.items():
            got = prompt(model, n)
            if got is None:
                rows.append(f"| {n * 64:,} | {name} | — | — | — | — | — | — |")
                continue
            ids, pixels = got
            with torch.no_grad():
                features = model.image_features(pixels)  # encoder + connector: outside the timing
            m = copy.copy(model)  # shares the weights; only its image_features is replaced
            m.image_features = lambda _pixels, f=features: f

            def prefill(m=m, ids=ids, pixels=pixels):
                with torch.no_grad():
                    return m(ids, context=m.encode_images(pixels, ids), use_cache=True).logits

            logits = prefill()
            assert logits.shape == (1, ids.shape[1], model.llm.config.vocab_size), (name, logits.shape)
            assert bool(torch.isfinite(logits).all()), name
            flops = sum(forward_flops(m, SimpleNamespace(pixels=pixels, input_ids=ids, attention_mask=None)).values())
            seconds = timed(prefill, repeats=5, warmup=1)
            base = base or seconds
            t0, f0 = first.setdefault(name, (seconds, flops))
            rows.append(f"| {n * 64:,} | {name} | {ids.shape[1]:,} | {seconds * 1000:.1f} | {flops / 1e9:.2f} | "
                        f"{flops / seconds / 1e9:.1f} ({flops / seconds / peak:.0%}) | {seconds / base:.2f}x | "
                        f"{(seconds / t0) / (flops / f0):.2f} |")
    print(f"machine: {machine()}; LLM 256 wide, 4 layers; 64 tokens per image; {len(TEXT)} text tokens; "
          f"encoder and connector excluded")
    print(f"matmul peak (1024^3, fp32): {peak / 1e9:.1f} GFLOP/s")
    print_table(["image tokens", "design", "sequence", "prefill ms", "forward GFLOPs", "GFLOP/s (% of matmul peak)",
                 "time vs A", "measured / predicted growth"], "rlrrrrrr", rows)


if __name__ == "__main__":
    main()
