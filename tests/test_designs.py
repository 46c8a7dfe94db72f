"""The fusion designs behind ``DESIGNS``: each checks its own config, a new one is one class, and
the cross-attention hooks refuse to run silently without their inputs."""

from __future__ import annotations

import pytest
import torch

from fusionlm.checkpoint import build_model
from fusionlm.config import validate
from fusionlm.data.layout import SequenceRule
from fusionlm.designs import DESIGNS, Unified
from fusionlm.errors import ConfigError
from fusionlm.fusion import ImageContext
from fusionlm.llm import decoder_layers


def test_the_five_designs_are_registered_with_their_own_rules(tiny_config):
    assert DESIGNS.names() == ["cross_attention", "early", "fuyu", "hybrid", "unified"]
    rules = {name: DESIGNS.get(name).sequence for name in DESIGNS.names()}
    assert {n: r.per_image for n, r in rules.items()} == {
        "cross_attention": "marker", "early": "codes", "fuyu": "rows", "hybrid": "grid", "unified": "grid"}
    assert [n for n in DESIGNS.names() if DESIGNS.get(n).cross] == ["cross_attention", "hybrid"]
    config = tiny_config("unified")
    config.model.fusion.kind = "hybrid"  # no tiles: the hybrid's own rule
    with pytest.raises(ConfigError, match=r"model\.fusion\.kind: hybrid puts the thumbnail in the sequence"):
        validate(config)
    config.model.tiling.max_tiles = 2
    config.data.pack = True  # packed rows: every design keeps each sample to its own images (test_packing)
    validate(config)


def test_a_new_design_is_one_registered_class(tiny_config, tokenizer, make_batch, forward, monkeypatch):
    """A made-up design: Method A whose image features are halved. Registering the class is all it
    takes for configs to name it and models to run it."""

    class Halved(Unified):
        name = "halved"
        sequence = SequenceRule("halved", per_image="grid")

        def context(self, model, images, features, counts, input_ids) -> ImageContext:
            return ImageContext(features=super().context(model, images, features, counts, input_ids).features / 2)

    monkeypatch.setitem(DESIGNS._items, "halved", Halved)
    config = tiny_config("unified")
    config.model.fusion.kind = "halved"
    torch.manual_seed(0)
    halved = build_model(validate(config), tokenizer).eval()
    torch.manual_seed(0)
    plain = build_model(tiny_config("unified"), tokenizer).eval()
    batch = make_batch(plain, [("color", 0), ("shape", 1)])
    with torch.no_grad():
        ours, theirs = forward(halved, batch), forward(plain, batch)
        context = plain.encode_images(batch.pixels, batch.input_ids)
        context.features = context.features / 2
        by_hand = plain(batch.input_ids, attention_mask=batch.attention_mask, context=context)
    assert isinstance(halved.design, Halved) and not isinstance(plain.design, Halved)
    torch.testing.assert_close(ours.logits, by_hand.logits, rtol=0, atol=0)
    assert not torch.equal(ours.logits, theirs.logits)


def test_cross_attention_that_misses_a_layer_is_an_error(make_model, make_batch, forward):
    """The gated blocks run from hooks that take their inputs from the decoder layers' keyword
    arguments; a layer that never receives them (a transformers change) must not pass silently."""
    model = make_model("cross_attention")
    batch = make_batch(model, [("color", 0)])
    with torch.no_grad():
        forward(model, batch)  # every layer reached
        decoder_layers(model.llm)[1]._forward_pre_hooks.clear()
        with pytest.raises(RuntimeError, match="cross-attention reached 1 of 2 decoder layers"):
            forward(model, batch)
