"""The static-cache decoder against transformers' forward pass: the same next-token logits at the
prefill and at every decoding step, for each design and LLM family, on left-padded batches."""

from __future__ import annotations


import pytest
import torch
from transformers import MistralConfig

from conftest import spec_for, tiny_config
from fusionlm.checkpoint import build_model
from fusionlm.config import validate
from fusionlm.generate import GeneralDecoder, encode_requests
from fusionlm.runtime import StaticDecoder, unsupported
from fusionlm.train.compiled import can_compile
from test_generate import _requests

STEPS = 5


def _model(tokenizer, fusion: str, family: str = "llama"):
    config = tiny_config("unified" if fusion == "hybrid" else fusion)
    config.model.fusion.kind = fusion
    if fusion == "hybrid":
        config.model.tiling.max_tiles, config.model.llm.max_length = 2, 256
    llm = config.model.llm
    if family == "qwen2":  # biases on the query/key/value projections
        llm.kind = "qwen2"
    if family == "mistral":  # not one of the recipe kinds: an imported architecture
        llm.arch = MistralConfig(vocab_size=len(tokenizer), hidden_size=llm.hidden_size,
                                 intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                                 num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                                 pad_token_id=tokenizer.pad_token_id, sliding_window=4096).to_dict()
    torch.manual_seed(0)
    model = build_model(validate(config), tokenizer).eval()
    for block in model.cross_blocks.values():  # open the gates: the images must matter
        torch.nn.init.constant_(block.attn_gate, 0.7)
        torch.nn.init.constant_(block.ffn_gate, 0.7)
    assert model.llm.config.model_type == family
    return model


@pytest.mark.parametrize("fusion, family", [
    ("unified", "llama"), ("cross_attention", "llama"), ("fuyu", "llama"), ("hybrid", "llama"),
    ("unified", "qwen2"), ("cross_attention", "mistral"),
])
def test_static_decoder_logits_equal_transformers(fusion, family, tokenizer, world):
    model = _model(tokenizer, fusion, family)
    ids, mask, images = encode_requests(model, tokenizer, _requests(world), spec_for(model), 256)
    assert not bool(mask.all())  # prompts of different lengths: left padding
    ctx = model.encode_images(images, ids)
    ours, theirs = StaticDecoder(model, len(ids), ids.shape[1] + STEPS), GeneralDecoder(model, use_cache=False)
    with torch.no_grad():
        a, b = ours.prefill(ids, mask, ctx), theirs.prefill(ids, mask, ctx)  # each (B, V)
        for step in range(STEPS):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {step}")
            token = a.argmax(-1)  # (B,)
            a, b = ours.step(token), theirs.step(token)


def test_static_decoder_sees_the_images(tokenizer, world):
    """Other images give other logits: the comparison above cannot pass with images ignored."""
    model = _model(tokenizer, "cross_attention")
    reqs = _requests(world)[:1]
    ids, mask, images = encode_requests(model, tokenizer, reqs, spec_for(model), 256)
    with torch.no_grad():
        first = StaticDecoder(model, 1, ids.shape[1] + 1).prefill(ids, mask, model.encode_images(images, ids))
        images.pixel_values = images.pixel_values.flip(-1)
        other = StaticDecoder(model, 1, ids.shape[1] + 1).prefill(ids, mask, model.encode_images(images, ids))
    assert (first - other).abs().max() > 1e-3


def test_unsupported_decoders_say_why(tokenizer):
    config = tiny_config("unified")
    config.model.llm.kind = "gpt2"
    model = build_model(validate(config), tokenizer)
    assert "'gpt2' is not one of llama, mistral, qwen2" in unsupported(model, 64)
    mistral = _model(tokenizer, "cross_attention", "mistral")
    assert unsupported(mistral, 4096) is None
    assert "longer than the sliding window (4096)" in unsupported(mistral, 4097)


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_decoding_equals_eager(tokenizer, world):
    """torch.compile'd steps (whole-cache attention under a mask) give the eager steps' logits."""
    model = _model(tokenizer, "cross_attention")
    ids, mask, images = encode_requests(model, tokenizer, _requests(world)[:2], spec_for(model), 256)
    assert not bool(mask.all())
    ctx = model.encode_images(images, ids)
    eager = StaticDecoder(model, len(ids), ids.shape[1] + STEPS)
    compiled = StaticDecoder(model, len(ids), ids.shape[1] + STEPS, compile=True)
    assert compiled.keys[0].shape[2] == 1 << (ids.shape[1] + STEPS - 1).bit_length()  # a power-of-two bucket
    with torch.no_grad():
        a, b = eager.prefill(ids, mask, ctx), compiled.prefill(ids, mask, ctx)
        for step in range(STEPS):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"step {step}")
            token = a.argmax(-1)
            a, b = eager.step(token), compiled.step(token)
