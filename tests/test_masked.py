"""The masked generation design (Show-o): the attention inside a drawn image, the cosine masking
that trains it, and the parallel unmasking that draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionlm.config import from_dict, validate
from fusionlm.data.batching.packing import segment_mask
from fusionlm.draw import DrawRequest, Sampling, draw, draw_codes
from fusionlm.errors import ConfigError
from fusionlm.data.batching.batches import ImageSpec, collate
from fusionlm.data.chat import IGNORE
from fusionlm.data.drawing import DrawLayout
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.world import World
from fusionlm.generators import image_blocks
from fusionlm.train.loop import train
from fusionlm.checkpoint import load_model
from test_drawing import built, drawing_dict


def allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask[:, 0] == 0  # (B, T, T) True where query i may read key j


def test_an_image_block_is_its_opening_and_its_codes():
    drawn = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert image_blocks(drawn).tolist() == [[0, 1, 1, 1, 1, 0, 2, 2, 2, 0]]


def test_inside_a_block_every_position_sees_every_other_and_text_stays_causal():
    segments = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])  # the last is padding
    blocks = torch.tensor([[0, 1, 1, 1, 0, 0, 0]])
    see = allowed(segment_mask(segments, torch.float32, blocks))[0]  # (T, T)
    assert see[1, 3] and see[2, 3] and see[3, 1]  # both ways inside the image
    assert not see[0, 1] and not see[0, 3]  # text before the image does not see it
    assert see[4, :4].all() and not see[4, 5]  # text after it: causal, as everywhere
    assert not see[:6, 6].any()  # nobody reads the padding
    causal = allowed(segment_mask(segments, torch.float32))[0]
    assert not causal[1, 3] and causal[3, 1]


def test_a_training_sample_hides_a_cosine_share_of_each_pictures_codes():
    layout = DrawLayout(begin=1, end=2, code=3, grid=(4, 4), image_size=16, mask=99)
    picture = [1, *[3] * 16, 2]
    ids = [7, 8, *picture, 9, *picture]
    labels = [IGNORE, IGNORE, *picture, IGNORE, *picture]
    counts = []
    for seed in range(30):
        out_ids, out_labels = layout.masked(ids, labels, np.random.default_rng(seed))
        assert (out_ids, out_labels) == layout.masked(ids, labels, np.random.default_rng(seed))  # the sample's own rng
        for first in (3, 22):
            hidden = [i for i in range(first, first + 16) if out_ids[i] == 99]
            assert all(out_labels[i] == 3 for i in hidden)  # a hidden code stays a target
            assert all(out_labels[i] == IGNORE and out_ids[i] == 3 for i in range(first, first + 16) if i not in hidden)
            counts.append(len(hidden))
        assert [out_ids[i] for i in (0, 1, 2, 19, 20, 21)] == [7, 8, 1, 2, 9, 1]  # the rest as it was
    assert min(counts) >= 1 and max(counts) <= 16 and len(set(counts)) > 5  # a schedule, not one share


def test_a_masked_model_learns_only_the_masked_codes_with_the_image_seen_both_ways():
    model, tokenizer, config = built(drawing_dict("masked"))
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    world = World(32, 0)
    samples = [world.sample("draw", "train", i) for i in range(3)] + [world.sample("color", "train", 0)]
    batch = collate([prompts.sample(s, rng=np.random.default_rng(i)) for i, s in enumerate(samples)],
                    ["x"] * 4, [], tokenizer.pad_token_id)
    blank = model.generation.mask_id(model)
    hidden = batch.input_ids == blank  # (B, T)
    assert 3 <= int(hidden.sum()) < 3 * 16 and (batch.labels[hidden] == model.ids.code).all()
    seen = {}
    handle = model.llm.register_forward_pre_hook(lambda _, args, kw: seen.update(kw), with_kwargs=True)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                labels=batch.labels, drawn=batch.drawn)
    handle.remove()
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    see = allowed(seen["attention_mask"])  # (B, T, T)
    slots = hidden | ((batch.labels == -100) & (batch.input_ids == model.ids.code))  # (B, T): the pictures' codes
    b, first = slots.nonzero()[0].tolist()
    assert see[b, first, first + 5] and see[b, first - 1, first + 3]  # the opening and codes see later codes
    assert not see[b, first - 2, first]  # the prompt does not
    assert int(out.loss_parts["image_targets"]) == int(hidden.sum())  # the hidden codes are the image targets
    text = (batch.labels != model.ids.code) & (batch.labels != -100)
    assert int(out.loss_parts["text_targets"]) == int(text[:, 1:].sum())


def test_the_masked_design_reads_through_a_tower():
    data = drawing_dict("masked")
    data["model"]["fusion"] = {"kind": "early"}
    data["model"]["encoder"]["kind"] = data["model"]["connector"]["kind"] = "none"
    data["stages"][1]["train"] = ["llm"]
    with pytest.raises(ConfigError, match="model.fusion.kind.*masked"):
        validate(from_dict(data))


def test_the_masked_design_refuses_row_ends_and_zero_steps():
    data = drawing_dict("masked")
    data["model"]["generation"]["row_end_token"] = "<row>"
    with pytest.raises(ConfigError, match="masked.*row_end_token"):
        validate(from_dict(data))
    data = drawing_dict("masked")
    data["model"]["generation"]["steps"] = 0
    with pytest.raises(ConfigError, match="model.generation.steps"):
        validate(from_dict(data))
    with pytest.raises(ConfigError, match="steps >= 1"):
        Sampling(steps=0).check()


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("masked") / "run"
    train(validate(from_dict(drawing_dict("masked"))), out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def masked(masked_run):
    return load_model(masked_run)


def test_a_masked_model_draws_in_its_steps_reproducibly_and_alone_as_in_a_batch(masked):
    model, tokenizer, _ = masked
    requests = [DrawRequest("a red circle", seed=1), DrawRequest("two blue squares above a triangle", seed=2)]
    guided = Sampling(cfg=3.0, top_k=20, steps=4)
    calls = []
    handle = model.llm.register_forward_hook(lambda *_: calls.append(1))
    together = draw_codes(model, tokenizer, requests, sampling=guided)
    handle.remove()
    assert len(calls) == 4  # one pass per step, every code at once
    assert together.shape == (2, 4, 4) and (together >= 0).all() and (together < 32).all()
    assert torch.equal(together, draw_codes(model, tokenizer, requests, sampling=guided))
    alone = torch.cat([draw_codes(model, tokenizer, [r], sampling=guided) for r in requests])
    assert torch.equal(together, alone)
    reseeded = [DrawRequest(r.prompt, seed=r.seed + 10) for r in requests]
    assert not torch.equal(together, draw_codes(model, tokenizer, reseeded, sampling=guided))
    pictures = draw(model, tokenizer, requests[:1], sampling=Sampling(steps=1))
    assert pictures[0].size == (16, 16)


def test_each_pass_fixes_the_cosine_share_of_codes_and_keeps_those_fixed(masked, monkeypatch):
    model, tokenizer, _ = masked
    blank = model.generation.mask_id(model)
    written = []
    forward = type(model).forward

    def spy(self, input_ids, **kw):
        written.append(int((input_ids[:, -16:] == blank).sum()))
        return forward(self, input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    draw_codes(model, tokenizer, [DrawRequest("a red circle")], sampling=Sampling(cfg=1.0, steps=4))
    # masked codes before each of the 4 passes: 16, then 16 cos(pi/2 s/4) left after pass s
    assert written == [16, 14, 11, 6]


def test_an_answer_in_text_and_pictures_is_refused_with_the_reason(masked):
    from fusionlm.converse import AnswerRequest, answer
    from fusionlm.serve.protocol import ApiError
    from fusionlm.serve.pictures import check_modalities

    model, tokenizer, _ = masked
    with pytest.raises(ConfigError, match="parallel passes.*--image-out"):
        answer(model, tokenizer, [AnswerRequest("draw a red circle")])
    assert answer(model, tokenizer, [AnswerRequest("what colour is it?")], max_pictures=0)[0].pictures == []
    with pytest.raises(ApiError, match="images/generations"):
        check_modalities(["text", "image"], True, iterative=True)
    assert check_modalities(["text"], True, iterative=True) is False


def test_info_counts_a_masked_pictures_passes_and_their_flops():
    from fusionlm.info import report

    masked = report(from_dict(drawing_dict("masked"))).drawing
    shared = report(from_dict(drawing_dict("shared"))).drawing
    assert masked["passes"] == 8 and shared["passes"] == 16  # its steps; one per code (16 codes)
    assert masked["flops"] > shared["flops"]  # each pass recomputes the prompt and the whole picture


def test_generate_draws_a_masked_picture_in_the_passes_asked_and_refuses_none(masked_run, tmp_path, capsys):
    from PIL import Image

    from fusionlm.cli import main

    model, tokenizer, _ = load_model(masked_run)
    out = tmp_path / "circle.png"
    rc = main(["generate", "--checkpoint", str(masked_run), "--prompt", "a red circle", "--image-out", str(out),
               "--steps", "2", "--seed", "3"])
    assert rc == 0 and capsys.readouterr().out.split() == [str(out)]
    (two,) = draw(model, tokenizer, [DrawRequest("a red circle", seed=3)], sampling=Sampling.of(model.config.generation, steps=2))
    assert list(Image.open(out).convert("RGB").getdata()) == list(two.getdata())
    (eight,) = draw(model, tokenizer, [DrawRequest("a red circle", seed=3)])  # the model's own 8 passes
    assert list(eight.getdata()) != list(two.getdata())
    rc = main(["generate", "--checkpoint", str(masked_run), "--prompt", "a red circle", "--image-out",
               str(tmp_path / "none.png"), "--steps", "0"])
    assert rc != 0 and "steps >= 1" in capsys.readouterr().err and not (tmp_path / "none.png").exists()
