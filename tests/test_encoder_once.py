"""A frozen encoder runs once per distinct image of a batch: the same features, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from fusionlm.checkpoint import build_model
from conftest import tiny_config

ITEMS = [("color", 0), ("shape", 1), ("color", 0), ("interleaved", 0), ("color", 0), ("shape", 1)]


@pytest.mark.parametrize("fusion", ["unified", "cross_attention"])
def test_a_frozen_encoder_encodes_each_distinct_image_once(fusion, tokenizer, make_batch, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_config(fusion), tokenizer).train()
    batch = make_batch(model, ITEMS)
    seen = []
    model.encoder.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    runs = {}
    for once in (False, True):
        if not once:  # the encoder as if it trained: every input encoded
            monkeypatch.setattr(type(model), "_encoder_fixed", lambda self: False)
        else:
            monkeypatch.undo()
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        model.zero_grad()
        out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                    labels=batch.labels, return_logits=False)
        out.loss.backward()
        runs[once] = (float(out.loss.detach()), [p.grad.clone() for p in model.connector.parameters()])
    images = len(batch.pixels)
    assert seen == [images, images - 3]  # three inputs repeat an earlier one
    (loss, grads), (loss_once, grads_once) = runs[False], runs[True]
    assert loss_once == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, grads_once):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_training_encoder_sees_every_input(tokenizer, make_batch):
    torch.manual_seed(0)
    model = build_model(tiny_config("unified"), tokenizer).train()
    batch = make_batch(model, ITEMS)
    seen = []
    model.encoder.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    model(batch.input_ids, pixel_values=batch.pixels, labels=batch.labels, return_logits=False)
    assert seen == [len(batch.pixels)]
