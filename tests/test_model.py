"""FusionLM on tiny random models: forward/backward of each fusion design, Method B's identity at
closed gates and per-image causal masking, Method A's scatter, Fuyu's layout, registries and the
safetensors round trip."""

from __future__ import annotations

import pytest
import torch

from fusionlm.data.pixels.processing import ImageBatch
from safetensors.torch import load_file, save_file

from conftest import FUSIONS, tiny_config
from fusionlm.checkpoint import WEIGHTS, build_model, load_model, load_weights, save_model
from fusionlm.config import EncoderConfig, validate
from fusionlm.designs import DESIGNS
from fusionlm.connectors import CONNECTORS
from fusionlm.data.tokenizer import IMAGE_NEWLINE
from fusionlm.encoders import ENCODERS, build_encoder
from fusionlm.errors import CheckpointError, ConfigError, SampleError
from fusionlm.llm import LLMS

# The SigLIP tower's pooling head and post-layernorm sit after the hidden states the encoder
# returns: they are parameters of the model that no loss can reach.
UNREACHABLE = ("encoder.tower.head.", "encoder.tower.post_layernorm.")
MIXED = [("color", 0), ("price", 0), ("text_only", 0), ("interleaved", 0)]


def _markers(batch, image_id: int, row: int) -> list[int]:
    return (batch.input_ids[row] == image_id).nonzero().flatten().tolist()


def _open_gates(model, value: float = 0.5) -> None:
    with torch.no_grad():
        for block in model.cross_blocks.values():
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_backward_reaches_every_part(fusion, make_model, make_batch, forward, world):
    model = make_model(fusion)
    batch = make_batch(model, MIXED)
    n_images = sum(len(world.sample(t, "train", i).images) for t, i in MIXED)
    assert n_images >= 5 and batch.num_images == n_images  # 1 + 2 (price) + 0 + interleaved
    per_image = {"unified": 16, "cross_attention": 1, "fuyu": 16}[fusion]  # a 4x4 grid, or one marker
    assert int((batch.input_ids == model.ids.image).sum()) == n_images * per_image
    out = forward(model, batch)
    assert out.logits.shape == (*batch.input_ids.shape, model.llm.config.vocab_size)
    assert torch.isfinite(out.loss) and 4.0 < out.loss.item() < 8.0  # ~ln(400) = 6 at random init
    out.loss.backward()

    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = {n for n, g in grads.items() if g is None}
    assert all(n.startswith(UNREACHABLE) for n in missing), sorted(missing)
    nonzero = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    llm = {n for n in grads if n.startswith("llm.")}
    assert llm and llm <= nonzero
    if fusion == "cross_attention":
        gates = {n for n in grads if n.endswith(("attn_gate", "ffn_gate"))}
        assert len(gates) == 4 and gates <= nonzero  # 2 blocks x 2 gates
        # Closed gates: the image path gets exactly zero gradient until they open.
        image_path = {n for n in grads if n.startswith(("encoder.", "connector.", "cross_blocks."))} - gates - missing
        assert image_path and not (image_path & nonzero)
    else:
        image_path = {n for n in grads if n.startswith(("encoder.", "connector."))} - missing
        assert image_path and image_path <= nonzero
        if fusion == "fuyu":
            assert not missing and not any(n.startswith("encoder.") for n in grads)  # raw patches


# ----------------------------------------------------------------------------- Method B


def test_cross_attention_closed_gates_is_the_text_model(make_model, make_batch):
    model = make_model("cross_attention")
    for items in ([("text_only", 0), ("text_only", 1)], [("color", 0), ("price", 0), ("text_only", 2)]):
        batch = make_batch(model, items)
        with torch.no_grad():
            fused = model(batch.input_ids, attention_mask=batch.attention_mask,
                          pixel_values=batch.pixels).logits
            bare = model.llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert torch.equal(fused, bare)


def test_cross_attention_sees_images_only_after_their_marker(make_model, make_batch):
    model = make_model("cross_attention")
    _open_gates(model)
    batch = make_batch(model, [("color", 0), ("price", 0), ("text_only", 2)])
    with torch.no_grad():
        fused = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).logits
        bare = model.llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    changed = (fused - bare).abs().amax(-1) > 0  # (B, T)
    for row in range(2):
        first = _markers(batch, model.ids.image, row)[0]
        length = int(batch.attention_mask[row].sum())
        assert first > 0
        assert not changed[row, :first].any()
        assert changed[row, first:length].all()
    assert not changed[2].any()  # a text-only row in the same batch stays the text model


def test_cross_attention_second_image_is_invisible_before_its_marker(make_model, make_batch):
    model = make_model("cross_attention")
    _open_gates(model)
    batch = make_batch(model, [("price", 0)])
    first, second = _markers(batch, model.ids.image, 0)
    other = batch.pixels.pixel_values.clone()
    other[1] = torch.randn(other[1].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(batch.input_ids, pixel_values=batch.pixels).logits[0]
        b = model(batch.input_ids, pixel_values=other).logits[0]
    changed = (a - b).abs().amax(-1) > 0  # (T,)
    assert first < second
    assert not changed[:second].any()
    assert changed[second:].all()


# ----------------------------------------------------------------------------- Method A


@pytest.mark.parametrize("fusion", ["unified", "fuyu"])
def test_image_features_land_on_image_positions(fusion, make_model, make_batch):
    model = make_model(fusion)
    batch = make_batch(model, [("color", 0), ("price", 0)])
    seen = {}
    model.llm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels)
        features = model.image_features(batch.pixels)  # (3, N, D)
        tokens = model.llm.get_input_embeddings()(batch.input_ids)
    embeds = seen["inputs_embeds"]  # (B, T, D)
    image = batch.input_ids == model.ids.image
    assert int(image.sum()) == 3 * features.shape[1]
    assert torch.equal(embeds[image], features.reshape(-1, features.shape[-1]))
    assert torch.equal(embeds[~image], tokens[~image])


@pytest.mark.parametrize("fusion", ["unified", "fuyu"])
def test_pixels_change_logits_from_the_image_on(fusion, make_model, make_batch):
    model = make_model(fusion)
    batch = make_batch(model, [("color", 0)])
    first = _markers(batch, model.ids.image, 0)[0]
    other = batch.pixels.pixel_values + 0.5 * torch.randn(batch.pixels.pixel_values.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(batch.input_ids, pixel_values=batch.pixels).logits[0]
        b = model(batch.input_ids, pixel_values=other).logits[0]
    changed = (a - b).abs().amax(-1) > 0
    assert not changed[:first].any()
    assert changed[first:].all()


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("count", [0, 2])
def test_image_count_mismatch_is_a_sample_error(fusion, count, make_model, make_batch):
    model = make_model(fusion)
    batch = make_batch(model, [("color", 0)])  # one image
    pixels = batch.pixels.pixel_values.repeat(count, 1, 1, 1)  # (count, 3, H, W)
    with pytest.raises(SampleError, match=r"image"):
        model(batch.input_ids, pixel_values=pixels)
    if count == 0:
        with pytest.raises(SampleError, match=r"no images"):
            model(batch.input_ids)


# ----------------------------------------------------------------------------- Fuyu


def test_fuyu_layout_has_a_newline_after_each_row(make_model, tokenizer, make_batch):
    model = make_model("fuyu")
    rows, cols = model.connector.grid
    assert (rows, cols) == (4, 4)
    newline = tokenizer.convert_tokens_to_ids(IMAGE_NEWLINE)
    assert model.ids.newline == newline != model.ids.image
    layout = model.image_layout()
    assert len(layout) == model.tokens_per_image == rows * (cols + 1) == 20
    for r in range(rows):
        row = layout[r * (cols + 1):(r + 1) * (cols + 1)]
        assert row == [model.ids.image] * cols + [newline]
    ids = make_batch(model, [("color", 0)]).input_ids[0].tolist()
    start = ids.index(model.ids.image)
    assert ids[start:start + 20] == layout


def test_patch_encoder_is_a_row_major_patchify():
    enc = build_encoder(EncoderConfig(kind="patches", image_size=8, patch_size=4))
    assert enc.grid == (2, 2) and enc.out_dim == 48
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = enc(ImageBatch.of(x, enc.grid))  # (2, 4, 48)
    # Fuyu's order within a patch: (row, col, channel)
    expected = torch.stack([
        torch.stack([x[i, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].permute(1, 2, 0).reshape(-1)
                     for r in range(2) for c in range(2)])
        for i in range(2)
    ])
    assert torch.equal(out, expected)
    assert out[0, 1, 0] == 4 and out[0, 1, 1] == 68  # patch (0, 1) starts at pixel (0, 4): channel 0, then 1 (64 + 4)


# ----------------------------------------------------------------------------- registries


@pytest.mark.parametrize("part,registry,known", [
    ("encoder", ENCODERS, ["siglip", "clip", "patches"]),
    ("connector", CONNECTORS, ["linear", "mlp"]),
    ("llm", LLMS, ["llama", "qwen2"]),
])
def test_unknown_component_lists_known_names(part, registry, known, tokenizer):
    config = tiny_config("unified")
    getattr(config.model, part).kind = "nope"
    with pytest.raises(ConfigError) as err:
        build_model(config, tokenizer)
    message = str(err.value)
    assert f"model.{part}.kind" in message and "'nope'" in message
    for name in set(known) | set(registry.names()):
        assert name in message


def test_unknown_fusion_lists_known_designs():
    config = tiny_config("unified")
    config.model.fusion.kind = "late"
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert all(k in str(err.value) for k in DESIGNS.names())


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fusion", FUSIONS)
def test_save_load_round_trip_gives_identical_logits(fusion, make_model, make_batch, tokenizer, tmp_path):
    model = make_model(fusion)
    _open_gates(model, 0.3)  # so the cross-attention weights matter
    batch = make_batch(model, [("price", 0), ("color", 1)])
    with torch.no_grad():
        before = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).logits
    save_model(model, tokenizer, tiny_config(fusion), tmp_path / "ckpt")
    loaded, tok, config = load_model(tmp_path / "ckpt")
    assert config.model.fusion.kind == fusion and len(tok) == len(tokenizer)
    with torch.no_grad():
        after = loaded(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).logits
    assert torch.equal(before, after)
    assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight  # still tied


@pytest.fixture
def saved(make_model, tokenizer, tmp_path):
    model = make_model("unified")
    path = save_model(model, tokenizer, tiny_config("unified"), tmp_path / "ckpt")
    return model, path / WEIGHTS


def test_wrong_shape_is_named(saved, make_model):
    model, file = saved
    state = load_file(str(file))
    state["connector.linear_1.weight"] = state["connector.linear_1.weight"][:, :-1].contiguous()
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=r"connector\.linear_1\.weight has shape"):
        load_weights(make_model("unified", seed=1), file)


def test_missing_key_is_named(saved, make_model):
    model, file = saved
    state = load_file(str(file))
    del state["llm.model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=r"missing key 'llm\.model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_weights(make_model("unified", seed=1), file)


def test_unexpected_key_is_named(saved, make_model):
    model, file = saved
    state = load_file(str(file))
    state["cross_blocks.0.attn_gate"] = torch.zeros(1)
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=r"unexpected key 'cross_blocks\.0\.attn_gate'"):
        load_weights(make_model("unified", seed=1), file)


def test_garbage_weights_name_the_file(saved, make_model):
    model, file = saved
    fresh = make_model("unified", seed=1)
    untouched = {k: v.clone() for k, v in fresh.state_dict().items()}
    file.write_bytes(b"\x00garbage, not safetensors" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_weights(fresh, file)
    with pytest.raises(CheckpointError, match=str(file.parent)):
        load_model(file.parent)
    assert all(torch.equal(v, untouched[k]) for k, v in fresh.state_dict().items())


def _loss_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, labels=batch.labels,
                loss_reduction="sum", **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_head_on_target_positions_alone_gives_the_same_loss_and_gradients(fusion, make_model, make_batch):
    """Training's forward (``return_logits=False``) runs the LM head on the positions with a target
    only: the loss and every gradient are those of the head run everywhere, to 1e-6."""
    model = make_model(fusion)
    batch = make_batch(model, MIXED)
    every, grads = _loss_and_grads(model, batch)
    targets, fast = _loss_and_grads(model, batch, return_logits=False)
    assert every.logits is not None and targets.logits is None
    assert int((batch.labels[:, 1:] != -100).sum()) < batch.labels.numel() // 2  # most positions have no target
    torch.testing.assert_close(targets.loss, every.loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == fast.keys()
    for name in grads:
        torch.testing.assert_close(fast[name], grads[name], rtol=1e-6, atol=1e-6, msg=name)
