"""A tiny random Llama 3.2 Vision (``MllamaForConditionalGeneration``) checkpoint, written with
``save_pretrained`` next to its ``MllamaProcessor`` (never downloaded).

As in the real checkpoints, ``<|image|>`` is the tokenizer's last id and lies past the text
config's ``vocab_size``: the embedding table has ``vocab_size + 8`` rows, the LM head only
``vocab_size``, so the image token can be read but never predicted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_tiny import LLAMA3_TEMPLATE, tiny_tokenizer

TILE = 16  # pixels per tile side
MAX_TILES = 4


def mllama_tokenizer():
    tokenizer = tiny_tokenizer(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|finetune_right_pad_id|>", "<|python_tag|>"],
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]}, replace_extra_special_tokens=False)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def mllama_checkpoint(path: Path, *, cross_layers: tuple[int, ...] = (1, 3), seed: int = 0) -> Path:
    from transformers import (
        MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor, MllamaTextConfig,
        MllamaVisionConfig,
    )

    tokenizer = mllama_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    assert image_id == len(tokenizer) - 1
    vision = MllamaVisionConfig(
        image_size=TILE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
        intermediate_size=64, intermediate_layers_indices=[0, 1], vision_output_dim=32 * 3, max_num_tiles=MAX_TILES,
    )
    text = MllamaTextConfig(
        vocab_size=image_id, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, cross_attention_layers=list(cross_layers),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_id=image_id)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random gates: fresh ones are 0 (cross-attention and tile embeddings would do nothing)
        for name, p in model.named_parameters():
            if "gate" in name:
                p.uniform_(0.5, 1.0)
    model.save_pretrained(path)
    images = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES,
                                     image_mean=[0.48145466, 0.4578275, 0.40821073],
                                     image_std=[0.26862954, 0.26130258, 0.27577711])
    MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=LLAMA3_TEMPLATE).save_pretrained(path)
    return Path(path)
