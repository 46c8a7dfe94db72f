"""Decoding invariances on tiny models: KV cache vs none, batched vs one by one, seeded sampling,
refused prompts, the LLM's own end ids, and Method B's image keys/values projected once per request."""

from __future__ import annotations

import pytest
import torch

from conftest import FUSIONS, make_batch, overfit, spec_for, tiny_config
from fusionlm.checkpoint import build_model
from fusionlm.data.chat import encode
from fusionlm.errors import SampleError
from fusionlm.fusion import GatedCrossAttentionBlock
from fusionlm.generate import MAX_NEW_TOKENS, Request, generate, generate_ids, stop_ids

TRAIN = [("color", 0), ("price", 0), ("shape", 1), ("count", 2)]


def _requests(world) -> list[Request]:
    """Four requests of different prompt lengths and 1, 2, 0 and 1 images."""
    color, price, count = (world.sample(t, "train", i) for t, i in (("color", 0), ("price", 0), ("count", 2)))
    return [
        Request(color.messages[0]["content"], color.images, id="color"),
        Request(price.messages[0]["content"], price.images, id="price"),
        Request("What is the colour of the shape?", [], id="text"),
        Request("Count the shapes.", count.images, id="count"),  # "<image>\n" prepended
    ]


@pytest.fixture(scope="module")
def trained(tokenizer, world, one_thread):
    """Per design, a tiny model overfit for 60 steps on 4 samples, so it answers with real tokens."""
    models = {}
    for fusion in FUSIONS:
        torch.manual_seed(0)
        model = build_model(tiny_config(fusion), tokenizer)
        batch = make_batch(model, tokenizer, [world.sample(t, "train", i) for t, i in TRAIN])
        losses = overfit(model, batch, steps=60)
        assert losses[-1] < 0.5 * losses[0]
        models[fusion] = model
    return models


@pytest.mark.parametrize("fusion", FUSIONS)
def test_kv_cache_equals_no_cache(fusion, trained, tokenizer, world, no_end):
    model, reqs = trained[fusion], _requests(world)
    spec = spec_for(model)
    cached = generate(model, tokenizer, reqs, spec, max_new_tokens=8, use_cache=True)
    plain = generate(model, tokenizer, reqs, spec, max_new_tokens=8, use_cache=False)
    assert cached == plain
    assert all(cached[i] for i in (0, 1, 3)), cached  # trained prompts give real tokens
    no_end(model)
    long_cached = generate(model, tokenizer, reqs, spec, max_new_tokens=8, use_cache=True)
    assert long_cached == generate(model, tokenizer, reqs, spec, max_new_tokens=8, use_cache=False)
    assert all(len(tokenizer(a)["input_ids"]) >= 4 for a in long_cached), long_cached


@pytest.mark.parametrize("fusion", FUSIONS)
def test_batched_equals_one_by_one(fusion, trained, tokenizer, world, no_end):
    model, reqs = trained[fusion], _requests(world)
    spec = spec_for(model)
    for stop in (True, False):
        if not stop:
            no_end(model)
        batched = generate(model, tokenizer, reqs, spec, max_new_tokens=8)
        single = [generate(model, tokenizer, [r], spec, max_new_tokens=8)[0] for r in reqs]
        assert batched == single
        assert all(batched[i] for i in (0, 1, 3)), batched


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(make_model, tokenizer, world, no_end):
    model, reqs = make_model("unified"), _requests(world)
    no_end(model)
    spec = spec_for(model)
    kw = dict(max_new_tokens=8, temperature=1.0)
    first = generate(model, tokenizer, reqs, spec, seed=7, **kw)
    assert first == generate(model, tokenizer, reqs, spec, seed=7, **kw)
    others = [generate(model, tokenizer, reqs, spec, seed=s, **kw) for s in (8, 9)]
    assert any(o != first for o in others)  # the seed is actually used
    greedy = generate(model, tokenizer, reqs, spec, max_new_tokens=8)
    assert greedy != first
    assert generate(model, tokenizer, reqs, spec, seed=3, top_p=1e-6, **kw) == greedy


def test_image_tokens_are_never_generated(make_model, tokenizer, world):
    """A generated <image> has no image behind it; the next-best token is taken instead."""
    sample = world.sample("color", "train", 0)
    word = tokenizer("green", add_special_tokens=False)["input_ids"][0]
    for fusion in FUSIONS:
        model = make_model(fusion)

        def boost(module, args, logits):
            logits = logits.clone()
            logits[..., model.ids.image] += 100.0
            logits[..., model.ids.newline] += 100.0
            logits[..., word] += 50.0
            return logits

        model.llm.lm_head.register_forward_hook(boost)
        for cache in (True, False):
            out = generate(model, tokenizer, [Request(sample.messages[0]["content"], sample.images)],
                           spec_for(model), max_new_tokens=3, use_cache=cache)
            assert out == [tokenizer.decode([word] * 3).strip()]


@pytest.mark.parametrize("static", [True, False])
def test_generation_stops_at_every_eos_id_of_the_llm(static, make_model, tokenizer, world):
    """An id in the LLM's ``generation_config.eos_token_id`` (an int or a list) ends an answer, as
    the end of turn does; with none there, the same id is an ordinary token."""
    model = make_model("unified")
    word, stop, other = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("green", "red", "blue"))
    assert len({word, stop, other, model.ids.end}) == 4
    calls: list[int] = []

    def force(module, args, logits):  # the first two tokens are `word`, every later one `stop`
        logits = logits.clone()
        logits[..., word if len(calls) < 2 else stop] += 100.0
        calls.append(1)
        return logits

    model.llm.lm_head.register_forward_hook(force)
    sample = world.sample("color", "train", 0)
    reqs = [Request(sample.messages[0]["content"], sample.images), Request("What colour?", [])]

    def run(eos) -> list[list[int]]:
        model.llm.generation_config.eos_token_id = eos
        calls.clear()
        return generate_ids(model, tokenizer, reqs, spec_for(model), max_new_tokens=5, static=static)

    assert run(None) == [[word, word, stop, stop, stop]] * 2
    assert stop_ids(model) == [model.ids.end]
    assert run(stop) == [[word, word]] * 2
    assert run([other, stop]) == [[word, word]] * 2
    assert stop_ids(model) == sorted({model.ids.end, other, stop})


def test_one_max_new_tokens_default(make_model, tokenizer, no_end):
    """``generate`` decodes ``MAX_NEW_TOKENS`` tokens when not told otherwise (the model's end never wins)."""
    model = make_model("unified")
    no_end(model)
    (ids,) = generate_ids(model, tokenizer, [Request("What colour?", [])], spec_for(model))
    assert len(ids) == MAX_NEW_TOKENS


def test_refused_prompts(make_model, tokenizer, world):
    model = make_model("unified")
    spec = spec_for(model)
    image = world.sample("color", "train", 0).images[0]
    with pytest.raises(SampleError, match=r"2 <image> placeholder\(s\) in the text but 1 image"):
        generate(model, tokenizer, [Request("<image>\n<image>\nWhat colour?", [image])], spec)
    with pytest.raises(SampleError, match=r"1 <image> placeholder\(s\) in the text but 0 image"):
        generate(model, tokenizer, [Request("<image>\nWhat colour?", [])], spec)
    with pytest.raises(SampleError, match=r"over the context of 128"):
        generate(model, tokenizer, [Request("colour " * 200, [image])], spec)
    # A prompt that fills the context exactly leaves no room to answer.
    req = Request("What colour is the shape?", [image])
    n = len(encode(req.sample(), tokenizer, model.image_layout(), max_length=128, add_generation_prompt=True).input_ids)
    with pytest.raises(SampleError, match=r"leaving no room"):
        generate(model, tokenizer, [req], spec, max_length=n)
    assert len(generate(model, tokenizer, [req], spec, max_length=n + 1)) == 1


@pytest.mark.parametrize("use_cache, static", [(True, True), (True, False), (False, False)])
def test_cross_attention_projects_image_kv_once(use_cache, static, make_model, tokenizer, world, no_end, monkeypatch):
    model = make_model("cross_attention")
    no_end(model)
    calls: dict[str, int] = {}
    for name, block in model.cross_blocks.items():
        assert isinstance(block, GatedCrossAttentionBlock)

        def counted(memory, _name=name, _inner=block.project_kv):
            calls[_name] = calls.get(_name, 0) + 1
            return _inner(memory)

        monkeypatch.setattr(block, "project_kv", counted)
    steps = []
    inner_embed = model.embed  # once per decoder call, on every decoding path
    monkeypatch.setattr(model, "embed", lambda *a, **kw: steps.append(1) or inner_embed(*a, **kw))
    reqs = _requests(world)[:2]  # 1 and 2 images
    out = generate(model, tokenizer, reqs, spec_for(model), max_new_tokens=6, use_cache=use_cache, static=static)
    assert len(out) == 2 and len(steps) == 6
    assert calls == {"0": 1, "1": 1}
