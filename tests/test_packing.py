"""Packing: several samples per row give the same loss as one sample per row, with less padding."""

from __future__ import annotations

import pytest
import torch

from fusionlm.config import from_dict, validate
from fusionlm.data.batching.batches import collate
from fusionlm.data.chat import encode
from fusionlm.data.batching.packing import pack_rows, segment_positions
from fusionlm.errors import ConfigError
from conftest import spec_for

ITEMS = [("color", 0), ("text_only", 1), ("price", 0), ("caption", 2), ("interleaved", 0), ("shape", 3)]


def batches(model, tokenizer, world, length):
    spec = spec_for(model)
    encoded, pixels = [], []
    for task, i in ITEMS:
        s = world.sample(task, "train", i)
        per_image = [spec.process_all(img) for img in s.images]
        encoded.append(encode(s, tokenizer, [model.layout.image_tokens(p) for p in per_image],
                              max_length=model.config.llm.max_length, end_token=model.config.tokenizer.end_token))
        pixels.extend(inp for p in per_image for inp in p)
    tasks = [t for t, _ in ITEMS]
    return (collate(encoded, pixels, tasks, [], tokenizer.pad_token_id),
            collate(encoded, pixels, tasks, [], tokenizer.pad_token_id, pack_length=length))


@pytest.mark.parametrize("fusion", ["unified", "fuyu"])
def test_packed_rows_give_the_same_loss_and_save_padding(fusion, make_model, tokenizer, world):
    model = make_model(fusion)
    plain, packed = batches(model, tokenizer, world, length=model.config.llm.max_length)
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]  # fewer rows
    targets = lambda batch: int((batch.labels[:, 1:] != -100).sum())  # noqa: E731  (what the loss reads)
    assert targets(packed) == targets(plain) and packed.num_tokens == plain.num_tokens
    with torch.no_grad():
        a = model(plain.input_ids, attention_mask=plain.attention_mask, pixel_values=plain.pixels,
                  labels=plain.labels).loss
        b = model(packed.input_ids, pixel_values=packed.pixels, labels=packed.labels,
                  segment_ids=packed.segments).loss
    assert float(b) == pytest.approx(float(a), rel=1e-5)
    waste = lambda batch: 1 - batch.num_tokens / batch.input_ids.numel()  # noqa: E731
    assert waste(packed) < waste(plain)


def test_rows_and_positions():
    class E:
        def __init__(self, n):
            self.input_ids = [0] * n

    assert pack_rows([E(5), E(4), E(3), E(6), E(1)], 10) == [[0, 1], [2, 3, 4]]
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]]


def test_packing_is_refused_with_cross_attention():
    with pytest.raises(ConfigError, match=r"data\.pack: packed rows need fusion unified or fuyu"):
        validate(from_dict({"data": {"pack": True}, "model": {"fusion": {"kind": "cross_attention"}}}))


def test_a_packed_run_trains(tmp_path):
    from fusionlm.train.loop import train
    from helpers_train import read_metrics, stage, tiny_dict

    data = tiny_dict()
    data["data"]["pack"] = True
    data["stages"] = [stage("s", steps=12, mixture={"color": 1, "text_only": 1, "caption": 1})]
    train(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
