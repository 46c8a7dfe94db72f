"""Interleaved few-shot prompts: images anywhere, and Method B's per-image visibility."""

from __future__ import annotations

import pytest
import torch

from fusionlm.data.fewshot import few_shot
from fusionlm.data.sample import IMAGE_TOKEN
from fusionlm.errors import SampleError
from conftest import make_batch


def test_examples_come_first_with_their_images(world):
    examples = [world.sample("color", "train", i) for i in range(2)]
    query = world.sample("shape", "test", 0)
    s = few_shot(examples, query)
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 3
    assert s.images == examples[0].images + examples[1].images + query.images
    assert s.all_text().count(IMAGE_TOKEN) == 3 and s.answers == query.answers and s.task == "shape"


def test_a_document_cannot_be_a_shot(world):
    with pytest.raises(SampleError, match="one question and its answer"):
        few_shot([world.sample("interleaved", "train", 0)], world.sample("color", "train", 0))


@pytest.mark.parametrize("visibility", ["preceding", "latest"])
def test_method_b_answers_see_only_earlier_images(visibility, make_model, tokenizer, world):
    model = make_model("cross_attention")
    model.config.fusion.visibility = visibility
    s = few_shot([world.sample("color", "train", i) for i in range(2)], world.sample("color", "train", 5))
    batch = make_batch(model, tokenizer, [s])
    ctx = model.encode_images(batch.pixels, batch.input_ids)
    visible = ctx.cross.for_call(batch.input_ids.shape[1]).visible[0]  # (T, S)
    markers = (batch.input_ids[0] == model.ids.image).nonzero().squeeze(1).tolist()
    per_image = visible.shape[1] // 3
    sees = torch.stack([visible[:, k * per_image:(k + 1) * per_image].all(-1) for k in range(3)], -1)  # (T, 3)
    for t in range(batch.input_ids.shape[1]):
        seen = [k for k in range(3) if markers[k] <= t]
        expected = seen if visibility == "preceding" else seen[-1:]
        assert sees[t].nonzero().squeeze(1).tolist() == expected, t


def test_few_shot_runs_through_the_model(make_model, tokenizer, world):
    for fusion in ("unified", "cross_attention", "fuyu"):
        model = make_model(fusion)
        s = few_shot([world.sample("count", "train", i) for i in range(2)], world.sample("count", "train", 9))
        batch = make_batch(model, tokenizer, [s, world.sample("color", "train", 0)])
        out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                    labels=batch.labels)
        assert torch.isfinite(out.loss) and batch.num_images == 4
