"""Training step: fusionlm vs transformers' LlavaForConditionalGeneration on the same weights and the
same batch (forward, backward, AdamW step), fp32 and bf16 autocast; the losses must agree.
Also the achieved FLOP/s of fusionlm's step as a fraction of a large matmul's, measured in the
same run.

    python benchmarks/train_step.py
"""

from __future__ import annotations


import torch

from common import train_pair, llava_pair, machine, train_table
from fusionlm.data.pixels.processing import ImageBatch

BATCH = 8


def main() -> None:
    torch.manual_seed(0)
    hf, processor, model, tokenizer, config, _ = llava_pair()
    from hf_tiny import noise_images
    from test_interop_llava import chat_text

    texts = [chat_text(tokenizer, f"<image>\\nWhat is shown in picture {i}?") + " A picture of noise." * (1 + i % 3)
             for i in range(BATCH)]
    images = noise_images([(64, 64)] * BATCH, seed=2)
    inputs = processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(inputs["input_ids"] == model.ids.image, -100)
    tokens = int(inputs["attention_mask"].sum())
    pixels = ImageBatch.of(inputs["pixel_values"], model.encoder.grid)

    pairs, agree, step_flops = train_pair(model, hf, inputs, pixels, labels)
    print(f"machine: {machine()}; batch {BATCH}, {tokens} real tokens; |loss difference| {agree:.2e}")
    train_table(pairs, tokens, step_flops)


if __name__ == "__main__":
    main()
