"""The diffusion design (Transfusion): raw pixel patches, the noise each training picture gets from its
sample, the attention inside a picture, the loss (next token on text, flow matching on patches) and
the sampler that denoises a picture in a few passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionlm.config import ImageTokenizerConfig, from_dict, validate
from fusionlm.data.batching.batches import ImageSpec, collate
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.world import World
from fusionlm.draw import DrawRequest, Sampling, draw, draw_codes, passes
from fusionlm.errors import ConfigError, SampleError
from fusionlm.generators import Noised
from fusionlm.image_tokenizers import build_image_tokenizer
from test_drawing import built, drawing_dict

PATCHES = {"kind": "patches", "image_size": 16, "downsample": 4, "code_dim": 48}


def diffusion_dict(llm: str = "llama") -> dict:
    data = drawing_dict("diffusion")
    data["model"]["image_tokenizer"] = dict(PATCHES)
    data["model"]["llm"]["kind"] = llm
    data["stages"] = data["stages"][1:]  # raw patches: no tokenizer to train
    data["stages"][0]["train"] = ["llm", "connector", "generation"]
    return data


def batch_of(llm: str = "llama"):
    model, tokenizer, config = built(diffusion_dict(llm))
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    world = World(32, 0)
    samples = [world.sample("draw", "train", i) for i in range(2)] + [world.sample("color", "train", 0)]
    batch = collate([prompts.sample(s, rng=np.random.default_rng(i)) for i, s in enumerate(samples)], ["x"] * 3, [],
                    tokenizer.pad_token_id)
    return model, tokenizer, config, batch


@pytest.fixture(scope="module")
def model_and_batch():
    return batch_of()


def test_patches_are_the_pictures_pixels_exactly():
    tok = build_image_tokenizer(ImageTokenizerConfig(**PATCHES))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    patches = tok.encode(pixels)
    assert patches.shape == (2, 4, 4, 48) and tok.grid == (4, 4) and tok.continuous
    torch.testing.assert_close(patches[1, 2, 3], pixels[1, :, 8:12, 12:16].reshape(-1), rtol=0, atol=0)
    assert torch.equal(tok.decode(patches), pixels)
    with pytest.raises(ConfigError, match="model.image_tokenizer.code_dim: a patch of 4x4 pixels is 48"):
        build_image_tokenizer(ImageTokenizerConfig(**{**PATCHES, "code_dim": 8}))


def test_each_training_picture_is_noised_from_its_own_sample(model_and_batch):
    model, tokenizer, config, batch = model_and_batch
    assert batch.noise.shape == (2, 3, 16, 16) and batch.times.shape == (2,)
    assert ((batch.times > 0) & (batch.times < 1)).all() and batch.times[0] != batch.times[1]
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    sample = World(32, 0).sample("draw", "train", 1)
    again = prompts.sample(sample, rng=np.random.default_rng(1))  # the same sample, the same seed
    assert torch.equal(again.noise[0], batch.noise[1]) and again.times[0] == pytest.approx(float(batch.times[1]))
    assert prompts.sample(sample).noise == []  # no seed (evaluation, drawing): no noise
    pictures = model.generation.noise(model, batch.drawn, batch.noise, batch.times)
    x0 = model.image_tokenizer.encode(batch.drawn).flatten(1, 2)  # (G, n, C)
    eps = model.image_tokenizer.encode(batch.noise).flatten(1, 2)
    t = batch.times[:, None, None]
    torch.testing.assert_close(pictures.patches, (1 - t) * x0 + t * eps)
    torch.testing.assert_close(pictures.target, eps - x0)
    with pytest.raises(SampleError, match="needs each drawn picture's noise"):
        model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, drawn=batch.drawn)


@pytest.mark.parametrize("llm", ["llama", "qwen2", "gpt2"])
def test_a_pictures_patches_see_each_other_and_text_before_it_does_not_see_them(llm):
    model, tokenizer, config, batch = batch_of(llm)
    model.eval()
    pictures = model.generation.noise(model, batch.drawn, batch.noise, batch.times)

    def run(p):
        with torch.no_grad():
            return model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, pictures=p)

    base = run(pictures)
    changed = Noised(pictures.patches.clone(), pictures.times)
    changed.patches[0, -1] += 1.0  # the first picture's last patch
    out = run(changed)
    moved = (out.velocity - base.velocity).abs().amax(-1)  # (G, n)
    assert moved[0, :-1].gt(0).all()  # every earlier patch of that picture sees it (both ways)
    assert torch.equal(out.velocity[1], base.velocity[1])  # another sample's picture does not
    first = int(torch.nonzero(batch.input_ids[0] == model.ids.code)[0])
    torch.testing.assert_close(out.logits[0, : first - 1], base.logits[0, : first - 1])  # text before: causal


def test_the_loss_is_next_token_on_text_plus_flow_matching_on_patches(model_and_batch):
    model, tokenizer, config, batch = model_and_batch
    model.train()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, labels=batch.labels,
                drawn=batch.drawn, noise=batch.noise, times=batch.times, loss_reduction="sum", loss_weights=(1.0, 5.0))
    parts = out.loss_parts
    assert int(parts["image_targets"]) == 2 * 16  # a patch counts as one target
    slots = batch.input_ids == model.ids.code
    text = batch.labels.masked_fill(batch.labels == model.ids.code, -100)
    assert int(parts["text_targets"]) == int((text[:, 1:] != -100).sum()) > 0  # patches are no text targets
    pictures = model.generation.noise(model, batch.drawn, batch.noise, batch.times)
    mse = (out.velocity - pictures.target).pow(2).mean(-1).sum()
    torch.testing.assert_close(parts["image_loss"], mse.detach())
    torch.testing.assert_close(out.loss, parts["text_loss"] + 5.0 * parts["image_loss"], rtol=1e-5, atol=1e-4)
    out.loss.backward()
    for name in ("gen_in", "gen_time", "gen_pos", "gen_out"):
        grad = sum(p.grad.abs().sum() for p in getattr(model, name).parameters())
        assert grad > 0, name
    assert slots.sum() == 32
    model.zero_grad()


def test_the_sampler_denoises_in_the_steps_asked_and_reproduces_with_a_seed(model_and_batch, monkeypatch):
    model, tokenizer, config, _ = model_and_batch
    model.eval()
    spec = ImageSpec.for_model(model, config)
    calls = []
    handle = model.llm.register_forward_pre_hook(lambda *_: calls.append(1))
    sampling = Sampling(cfg=3.0, steps=5)
    patches = draw_codes(model, tokenizer, [DrawRequest("a red circle", seed=1), DrawRequest("a blue square", seed=2)],
                         spec, sampling=sampling)
    handle.remove()
    assert patches.shape == (2, 4, 4, 48) and len(calls) == 5 == passes(model, sampling)
    alone = draw_codes(model, tokenizer, [DrawRequest("a blue square", seed=2)], spec, sampling=sampling)
    torch.testing.assert_close(alone[0], patches[1], rtol=1e-4, atol=1e-5)  # its own, whoever shares the batch
    other = draw_codes(model, tokenizer, [DrawRequest("a blue square", seed=3)], spec, sampling=sampling)
    unguided = draw_codes(model, tokenizer, [DrawRequest("a blue square", seed=2)], spec, sampling=Sampling(steps=5))
    assert not torch.allclose(other, alone) and not torch.allclose(unguided, alone)
    (picture,) = draw(model, tokenizer, [DrawRequest("a red circle")], spec, sampling=Sampling(steps=2))
    assert picture.size == (16, 16)


def test_the_design_asks_for_patches():
    data = diffusion_dict()
    data["model"]["image_tokenizer"] = {"kind": "vq", "image_size": 16, "downsample": 4}
    with pytest.raises(ConfigError, match="model.image_tokenizer.kind.*patches"):
        validate(from_dict(data))
    data = diffusion_dict()
    data["model"]["generation"]["steps"] = 0
    with pytest.raises(ConfigError, match="model.generation.steps"):
        validate(from_dict(data))


def test_picture_positions_without_their_patches_are_refused(model_and_batch):
    model, tokenizer, config, batch = model_and_batch
    pictures = model.generation.noise(model, batch.drawn, batch.noise, batch.times)
    one = Noised(pictures.patches[:1], pictures.times[:1])  # the batch has two pictures' positions
    with pytest.raises(SampleError, match="32 picture positions and 16 patches"):
        model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, pictures=one)
