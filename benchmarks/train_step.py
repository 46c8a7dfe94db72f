"""Training step: fusionlm vs transformers' LlavaForConditionalGeneration on the same weights and the
same batch (forward, backward, AdamW step), fp32 and bf16 autocast; the losses must agree.
Also the achieved FLOP/s of fusionlm's step as a fraction of a large matmul's, measured in the
same run.

    python benchmarks/train_step.py
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import count_cpu_attention, llava_pair, machine, train_table
from fusionlm.data.processing import ImageBatch

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

    ours_model, hf_model = copy.deepcopy(model).train(), copy.deepcopy(hf).train()
    ours_fwd = lambda: ours_model(inputs["input_ids"], attention_mask=inputs["attention_mask"],  # noqa: E731
                                  pixel_values=pixels, labels=labels).loss
    hf_fwd = lambda: hf_model(**inputs, labels=labels).loss  # noqa: E731
    with torch.no_grad():
        agree = abs(float(ours_fwd()) - float(hf_fwd()))
    count_cpu_attention()  # else the attention products count 0 FLOPs on CPU
    with FlopCounterMode(display=False) as counter:
        ours_fwd().backward()
    ours_model.zero_grad(set_to_none=True)
    step_flops = counter.get_total_flops()
    print(f"machine: {machine()}; batch {BATCH}, {tokens} real tokens; |loss difference| {agree:.2e}")
    train_table({"fusionlm": (ours_model, ours_fwd), "transformers": (hf_model, hf_fwd)}, tokens, step_flops)


if __name__ == "__main__":
    main()
