"""Training step of a cross-attention model: fusionlm vs transformers' MllamaForConditionalGeneration
on the same weights and the same batch (forward, backward, AdamW step), fp32 and bf16 autocast; the
losses must agree. Also the achieved FLOP/s of fusionlm's step as a fraction of a large matmul's,
measured in the same run (attention products included: see ``fusionlm.info.count_cpu_attention``).

    cd benchmarks && python train_step_mllama.py
"""

from __future__ import annotations


import torch

from common import train_pair, machine, mllama_pair, train_table

BATCH = 8


def main() -> None:
    torch.manual_seed(0)
    hf, processor, model, tokenizer, config, _ = mllama_pair()
    from test_interop_mllama import chat_text, our_images, pictures

    imgs = pictures()  # 1x2, 1x1, 3x1 and 2x2 tiles of 16 px
    texts = [chat_text(tokenizer, f"<image>\nWhat is shown in picture {i}?") + " A picture of noise." * (1 + i % 3)
             for i in range(BATCH)]
    inputs = processor(text=texts, images=[[imgs[i % len(imgs)]] for i in range(BATCH)], padding=True,
                       padding_side="right", return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(inputs["input_ids"] == model.ids.image, -100)  # past the LM head's vocabulary
    tokens = int(inputs["attention_mask"].sum())
    pixels = our_images(model, inputs)
    tiles = int(inputs["aspect_ratio_mask"].sum())

    pairs, agree, step_flops = train_pair(model, hf, inputs, pixels, labels)
    text = hf.config.text_config
    print(f"machine: {machine()}; batch {BATCH}, {tokens} real tokens, {tiles} image tiles; "
          f"text {text.hidden_size} wide, {text.num_hidden_layers} layers (cross-attention: "
          f"{text.cross_attention_layers}); |loss difference| {agree:.2e}")
    print(f"step: {step_flops / 1e9:.2f} GFLOP")
    train_table(pairs, tokens, step_flops)


if __name__ == "__main__":
    main()
