"""Tiny random transformers checkpoints, written with ``save_pretrained`` (never downloaded).

Each builder returns the directory; the tokenizer is a small byte-level BPE trained here with
the format's special tokens, so every id the model sees is real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "What color is the square? The square is red.", "Describe the image in one sentence.",
    "A small blue circle next to a green triangle.", "How many shapes are there? There are three shapes.",
    "USER: ASSISTANT: the answer is yes no maybe left right top bottom",
] * 20


def tiny_tokenizer(specials: list[str], *, vocab_size: int = 300, **named) -> PreTrainedTokenizerFast:
    """A BPE tokenizer whose first ids are ``specials``; ``named`` maps roles (bos_token…) to them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    extra = named.pop("extra_special_tokens", {})  # named tokens a processor reads (Janus's image_token…)
    rest = [s for s in specials if s not in named.values() and s not in extra.values()]
    if extra:
        return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra, **named)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=rest, **named)


LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
    "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def llava_checkpoint(path: Path, *, tower: str = "clip", feature_layer: int = -2, strategy: str = "default",
                     kv_heads: int = 2, image_size: int = 32, chat_template: bool = True, seed: int = 0) -> Path:
    """``chat_template=False``: neither the tokenizer nor the processor has one (as a new user's may not)."""
    from transformers import (
        CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor, SiglipImageProcessorPil, SiglipVisionConfig,
    )

    tokenizer = tiny_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], unk_token="<unk>", bos_token="<s>",
                               eos_token="</s>", pad_token="<pad>")
    template = LLAVA_TEMPLATE if chat_template else None
    tokenizer.chat_template = template
    vision_kw = dict(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64)
    if tower == "clip":
        vision = CLIPVisionConfig(**vision_kw)
        images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    else:
        vision = SiglipVisionConfig(**vision_kw)
        images = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    extra = 1 if tower == "clip" else 0
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
                   chat_template=template, num_additional_image_tokens=extra).save_pretrained(path)
    return Path(path)


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llm_checkpoint(path: Path, family: str = "llama", *, chat_template: bool = True, seed: int = 0) -> Path:
    """A tiny pretrained-style causal LM with its own tokenizer (no image token in it)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    tokenizer = tiny_tokenizer(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    if chat_template:
        tokenizer.chat_template = LLAMA3_TEMPLATE
    n = len(tokenizer)
    if family == "gpt2":
        config = GPT2Config(vocab_size=n, n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=0,
                            eos_token_id=1)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
        config = cls(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                     tie_word_embeddings=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def tower_checkpoint(path: Path, kind: str = "siglip", *, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny pretrained-style vision tower with its image processor."""
    from transformers import (
        CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessorPil, SiglipVisionConfig,
        SiglipVisionModel,
    )

    kw = dict(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)
    torch.manual_seed(seed)
    if kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**kw)).save_pretrained(path)
        SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    else:
        CLIPVisionModel(CLIPVisionConfig(**kw)).save_pretrained(path)
        CLIPImageProcessorPil(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return Path(path)


def noise_images(sizes: list[tuple[int, int]], seed: int = 0):
    """Random RGB images of the given (width, height) sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def assert_pixels_are_the_processors(processor, model, config, images) -> None:
    """fusionlm's preprocessing of each image gives bitwise the processor's ``pixel_values``."""
    from fusionlm.data.pixels.processing import ImageSpec

    spec = ImageSpec.for_model(model, config)
    for img in images:
        theirs = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(spec.process(img).pixels, theirs)


def import_pair(tmp: Path, source: Path, hf_class, processor_class) -> tuple:
    """Import ``source`` into ``tmp/ours``: (transformers model, its processor on the Pillow backend,
    our model, tokenizer, config, source dir, our dir)."""
    from fusionlm.checkpoint import load_model
    from fusionlm.interop import import_checkpoint

    ours = import_checkpoint(str(source), tmp / "ours", log=lambda *_: None)
    model, tokenizer, config = load_model(ours)
    return (hf_class.from_pretrained(source).eval(), processor_class.from_pretrained(source, backend="pil"),
            model, tokenizer, config, source, ours)


JANUS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>: {{ m['content'] }}\n\n{% else %}<|Assistant|>: "
    "{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|>:"
    "{% endif %}"
)


def janus_checkpoint(path: Path, *, image_size: int = 32, width: int = 64, layers: int = 2, kv_heads: int = 2,
                     seed: int = 0) -> Path:
    """A tiny ``JanusForConditionalGeneration``: a vision tower of 8-pixel patches (4x4 at 32 px), a
    VQ model whose code grid is the same (drawing 16-pixel pictures at 4x4), a Llama ``width`` wide,
    and Janus's named tokens (image, begin and end of image)."""
    from transformers import (
        JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor, JanusVisionConfig,
        JanusVQVAEConfig, LlamaConfig,
    )

    specials = ["<unk>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<pad>", "<image_placeholder>",
                "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"]
    tokenizer = tiny_tokenizer(specials, unk_token="<unk>", bos_token=specials[1], eos_token=specials[2],
                               pad_token="<pad>", extra_special_tokens={
                                   "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                                   "eoi_token": "<end_of_image>"})
    tokenizer.chat_template = JANUS_TEMPLATE
    vision = JanusVisionConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, mlp_ratio=2.0, projection_dim=width, depth=2,
                               num_image_tokens=(image_size // 8) ** 2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=width,
                          image_token_embed_dim=width, num_hidden_layers=2)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, bos_token_id=1,
                       eos_token_id=2)
    config = JanusConfig(vision_config=vision, vq_config=vq, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    torch.manual_seed(seed)
    JanusForConditionalGeneration(config).eval().save_pretrained(path)
    images = JanusImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)
    JanusProcessor(image_processor=images, tokenizer=tokenizer, chat_template=JANUS_TEMPLATE,
                   num_image_tokens=vision.num_image_tokens).save_pretrained(path)
    return Path(path)


EMU3_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
    "{{ m['content'] }}<|extra_204|>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def emu3_checkpoint(path: Path, *, image_size: int = 32, width: int = 64, layers: int = 2, kv_heads: int = 2,
                    codebook: int = 64, seed: int = 0) -> Path:
    """A tiny ``Emu3ForConditionalGeneration``: a VQ model of one code per 8 pixels (4x4 codes at
    32 px, the size its processor reads), its ``codebook`` visual tokens at the end of the tokenizer
    and the vocabulary (as Emu3's own are), Emu3's named tokens, and a Llama-shaped text model."""
    from transformers import (
        Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor, Emu3TextConfig,
        Emu3VQVAEConfig,
    )

    specials = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<image>", "<|image start|>", "<|image end|>",
                "<|image token|>", "<|extra_200|>", "<|extra_201|>"]
    tokenizer = tiny_tokenizer(specials, bos_token="<|extra_203|>", eos_token="<|extra_204|>",
                               pad_token="<|endoftext|>", extra_special_tokens={
                                   "image_token": "<image>", "boi_token": "<|image start|>",
                                   "eoi_token": "<|image end|>", "image_wrapper_token": "<|image token|>",
                                   "eof_token": "<|extra_201|>"})
    tokenizer.add_tokens([f"<|visual token {i:06d}|>" for i in range(codebook)], special_tokens=True)
    tokenizer.chat_template = EMU3_TEMPLATE
    vq = Emu3VQVAEConfig(codebook_size=codebook, embed_dim=8, latent_channels=8, base_channels=32,
                         channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
                         temporal_downsample_factor=2)
    text = Emu3TextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                          max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map=tokenizer.get_vocab())
    torch.manual_seed(seed)
    Emu3ForConditionalGeneration(config).eval().save_pretrained(path)
    images = Emu3ImageProcessor(min_pixels=image_size ** 2, max_pixels=image_size ** 2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)
    Emu3Processor(image_processor=images, tokenizer=tokenizer, chat_template=EMU3_TEMPLATE).save_pretrained(path)
    return Path(path)
