"""The next-scale generation design (VAR): the multi-scale residual tokenizer, what each position
reads and sees (never a scale it predicts or a finer one), and the sampler that draws a scale a pass."""

from __future__ import annotations

import pytest
import torch

from fusionlm.config import ImageTokenizerConfig, from_dict, validate
from fusionlm.data.batching.batches import ImageSpec, collate
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.world import World
from fusionlm.draw import DrawRequest, Sampling, draw_codes, passes
from fusionlm.errors import ConfigError, SampleError
from fusionlm.image_tokenizers import build_image_tokenizer
from test_drawing import built, drawing_dict

SMALL = dict(kind="multiscale", image_size=16, downsample=4, codebook_size=32, code_dim=8, channels=8)


def next_scale_dict(llm: str = "llama") -> dict:
    data = drawing_dict("next_scale")
    data["model"]["image_tokenizer"]["kind"] = "multiscale"
    data["model"]["llm"]["kind"] = llm
    data["stages"][1]["train"] = ["llm", "connector", "generation"]
    return data


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def any_llm(request):
    return batch_of(request.param)


@pytest.fixture(scope="module")
def model_and_batch():
    return batch_of("llama")


def batch_of(llm: str):
    model, tokenizer, config = built(next_scale_dict(llm))
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    world = World(32, 0)
    samples = [world.sample("draw", "train", i) for i in range(2)] + [world.sample("color", "train", 0)]
    batch = collate([prompts.sample(s) for s in samples], ["x"] * 3, [], tokenizer.pad_token_id)
    return model, tokenizer, config, batch


def test_the_tokenizer_writes_a_picture_coarse_to_fine_in_one_codebook():
    tok = build_image_tokenizer(ImageTokenizerConfig(**SMALL))
    assert tok.scales == [1, 2, 4] and tok.grid == (1, 21) and tok.spans() == [(0, 1), (1, 5), (5, 21)]
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    out = tok(pixels)
    assert out.codes.shape == (3, 1, 21) and torch.isfinite(out.loss)
    tok.eval()
    codes = tok.encode(pixels)
    assert codes.shape == (3, 1, 21) and int(codes.max()) < 32
    maps = tok.maps(codes)
    assert [m.shape for m in maps] == [(3, 8, 4, 4)] * 3
    torch.testing.assert_close(tok.decode(codes), tok.decoder(maps[0] + maps[1] + maps[2]))
    # each scale quantises what the coarser ones left: the finer scales bring the sum nearer the features
    f = tok.encoder(pixels).detach()
    errors = [float((f - sum(maps[: i + 1])).pow(2).mean()) for i in range(3)]
    assert errors[2] < errors[0]
    for scales in ([1, 2, 3], [2, 1, 4], [4, 4]):
        with pytest.raises(ConfigError, match="model.image_tokenizer.scales"):
            build_image_tokenizer(ImageTokenizerConfig(**SMALL, scales=scales))


def test_a_scale_input_reads_only_coarser_scales():
    torch.manual_seed(1)
    tok = build_image_tokenizer(ImageTokenizerConfig(**SMALL))
    tok(torch.rand(8, 3, 16, 16) * 2 - 1)  # the codebook seeded by k-means (an untouched one is all zeros)
    tok.eval()
    codes = torch.randint(0, 32, (2, 21))
    base = tok.scale_inputs(codes)  # (2, 20, 8): row j predicts code j+1
    assert base.shape == (2, 20, 8)
    for (start, end), later in zip(tok.spans(), ([0, 4], [4, 20], [20, 20])):
        changed = codes.clone()
        changed[:, start:end] = (changed[:, start:end] + 1) % 32
        moved = (tok.scale_inputs(changed) - base).abs().amax((0, 2)) > 0  # (20,)
        assert not moved[: later[0]].any()  # rows predicting this scale or a coarser one do not read it
        assert moved[later[0]: later[1]].any() or later[0] == later[1]  # the next scale's rows do


def test_the_blocks_are_one_a_scale_and_the_opening_predicts_the_first(model_and_batch):
    model = model_and_batch[0]
    ids = torch.tensor([[5, 6, model.ids.begin_image, *[model.code_offset] * 21, model.ids.end_image, 7]])
    blocks = model.generation.blocks(model, ids)[0].tolist()
    assert blocks[:3] == [0, 0, 1]  # text causal; the opening predicts scale 1
    assert blocks[3:7] == [2] * 4 and blocks[7:23] == [3] * 16  # each scale's predicting positions
    assert blocks[23:] == [0, 0, 0]  # the last code predicts the end: causal
    two = torch.cat([ids, ids], 1)
    assert model.generation.blocks(model, two)[0].tolist()[26:29] == [0, 0, 4]  # the second picture numbers on


def test_no_position_sees_a_scale_it_predicts_or_a_finer_one(any_llm):
    """With every LLM kind (each takes the block-causal mask its own way)."""
    model, tokenizer, config, batch = any_llm
    filled = model.with_codes(batch.input_ids, batch.drawn)  # (B, T)
    row = 0
    slots = torch.nonzero(filled[row] >= model.code_offset).squeeze(-1)  # (n,) the first picture's codes
    assert len(slots) == 21
    spans = model.image_tokenizer.spans()
    model.eval()

    def code_logits(ids):
        with torch.no_grad():
            return model(ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).code_logits[row]  # (T, K)

    base = code_logits(filled)
    for s, (start, end) in enumerate(spans):
        changed = filled.clone()
        changed[row, slots[start:]] = model.code_offset + (changed[row, slots[start:]] - model.code_offset + 1) % 32
        out = code_logits(changed)
        # position slots[i] - 1 scores code i: those of scales up to s must not move
        scoring = slots - 1
        torch.testing.assert_close(out[: scoring[end - 1] + 1], base[: scoring[end - 1] + 1])
        if end < len(slots):
            assert not torch.allclose(out[scoring[end]:scoring[-1] + 1], base[scoring[end]:scoring[-1] + 1])


def test_training_scores_codes_and_text_and_reaches_the_input_map(model_and_batch):
    model, tokenizer, config, batch = model_and_batch
    model.train()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                labels=batch.labels, drawn=batch.drawn)
    out.loss.backward()
    assert int(out.loss_parts["image_targets"]) == 2 * 21 and int(out.loss_parts["text_targets"]) > 0
    assert model.gen_in.weight.grad.abs().sum() > 0 and model.gen_level.weight.grad.abs().sum() > 0
    assert model.part_of("gen_in.weight") == "generation"
    model.zero_grad()


def test_the_sampler_draws_a_scale_a_pass_and_reproduces_with_a_seed(model_and_batch):
    model, tokenizer, config, _ = model_and_batch
    model.eval()
    spec = ImageSpec.for_model(model, config)
    calls = []
    handle = model.llm.register_forward_pre_hook(lambda *_: calls.append(1))
    guided = Sampling(cfg=3.0)
    codes = draw_codes(model, tokenizer, [DrawRequest("a red circle", seed=1), DrawRequest("a blue square", seed=2)],
                       spec, sampling=guided)
    handle.remove()
    assert codes.shape == (2, 1, 21) and len(calls) == 3 == passes(model, guided)
    alone = draw_codes(model, tokenizer, [DrawRequest("a blue square", seed=2)], spec, sampling=guided)
    assert torch.equal(alone[0], codes[1])  # a request's picture is its own, whoever shares the batch
    other = draw_codes(model, tokenizer, [DrawRequest("a blue square", seed=3)], spec, sampling=guided)
    assert not torch.equal(other, alone)

def test_guidance_ramps_from_none_on_the_first_scale(model_and_batch, monkeypatch):
    """VAR's ramp: the scores the first scale is drawn from are the unguided ones, later scales' not."""
    import fusionlm.draw as draw_module

    model, tokenizer, config, _ = model_and_batch
    model.eval()
    seen = []
    pick_each = draw_module.pick_each
    monkeypatch.setattr(draw_module, "pick_each", lambda scores, *a: seen.append(scores) or pick_each(scores, *a))
    for cfg in (1.0, 8.0):
        draw_codes(model, tokenizer, [DrawRequest("a red circle")], ImageSpec.for_model(model, config),
                   sampling=Sampling(cfg=cfg, temperature=0.0))
    plain, guided = seen[:3], seen[3:]
    torch.testing.assert_close(guided[0], plain[0])
    assert all(not torch.allclose(g, p) for g, p in zip(guided[1:], plain[1:]))


def test_the_design_asks_for_a_multiscale_tokenizer_and_a_tower():
    data = next_scale_dict()
    data["model"]["image_tokenizer"]["kind"] = "vq"
    with pytest.raises(ConfigError, match="model.image_tokenizer.kind.*multiscale"):
        validate(from_dict(data))
    data = next_scale_dict()
    data["model"]["generation"]["row_end_token"] = "<row>"
    with pytest.raises(ConfigError, match="'next_scale' generation writes an image's codes alone"):
        validate(from_dict(data))


def test_a_picture_cut_short_is_refused_naming_the_run_length(model_and_batch):
    model = model_and_batch[0]
    ids = torch.tensor([[5, model.ids.begin_image, *[model.code_offset] * 20, model.ids.end_image]])  # 20 of 21
    with pytest.raises(SampleError, match="a run of 21 codes"):
        model.generation.blocks(model, ids)
