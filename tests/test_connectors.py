"""The resampling connectors (avgpool, cabstractor, perceiver, qformer) on tiny sizes: token counts
per grid, per-image independence from padding and from the rest of the batch, both fusion designs
end to end, learning, and config errors that name their key."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fusionlm.checkpoint import build_model
from fusionlm.config import ConnectorConfig
from fusionlm.connectors import CONNECTORS, build_connector
from fusionlm.errors import ConfigError

WIDTH = 32  # encoder and LLM width of conftest's tiny config
CONFIGURED = (4, 4)  # the tiny encoder's grid
NUM_TOKENS = {"avgpool": 4, "cabstractor": 4, "perceiver": 6, "qformer": 6}
KINDS = list(NUM_TOKENS)
GRIDS = [(4, 4), (2, 6), (3, 3), (5, 5)]  # zero-padded to 25 tokens
# Output tokens per image of GRIDS: pooling keeps the aspect (about 4 tokens); resamplers a fixed 6.
EXPECTED = {"avgpool": [4, 3, 4, 4], "cabstractor": [4, 3, 4, 4], "perceiver": [6] * 4, "qformer": [6] * 4}
MIXED = [("color", 0), ("price", 0), ("text_only", 0), ("interleaved", 0)]


def make_connector(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = ConnectorConfig(kind=kind, num_tokens=NUM_TOKENS[kind], depth=2, num_heads=4)
    for key, value in overrides.items():
        setattr(config, key, value)
    return build_connector(config, WIDTH, WIDTH, CONFIGURED).eval()


def padded(grids, *, fill: str = "zeros", seed: int = 1) -> torch.Tensor:
    """(I, N_max, WIDTH) features of images with ``grids``; padding is zeros or large noise."""
    gen = torch.Generator().manual_seed(seed)
    n_max = max(r * c for r, c in grids)
    feats = torch.randn(len(grids), n_max, WIDTH, generator=gen)
    for i, (r, c) in enumerate(grids):
        pad = feats[i, r * c:]
        pad.copy_(torch.zeros_like(pad) if fill == "zeros" else 1e4 * torch.randn(pad.shape, generator=gen))
    return feats


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("kind", KINDS)
def test_configured_grid_shapes(kind):
    conn = make_connector(kind)
    assert type(conn) is CONNECTORS.get(kind)
    n = NUM_TOKENS[kind]
    assert conn.num_tokens == n and conn.grid == ((2, 2) if kind in ("avgpool", "cabstractor") else (1, n))
    feats = torch.randn(3, 16, WIDTH)
    with torch.no_grad():
        out = conn(feats)  # grids None: every image has the configured grid
        assert out.shape == (3, n, WIDTH) and torch.isfinite(out).all()
        close(out, conn(feats, [CONFIGURED] * 3))
        assert not torch.allclose(out[0], out[1])  # different images, different tokens


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_grids_shapes_and_zero_padding(kind):
    conn = make_connector(kind)
    counts = EXPECTED[kind]
    assert [conn.grid_rule(conn.config).apply(g)[0] * conn.grid_rule(conn.config).apply(g)[1] for g in GRIDS] == counts
    with torch.no_grad():
        out = conn(padded(GRIDS), GRIDS)
    assert out.shape == (len(GRIDS), max(counts), WIDTH)
    for row, n in zip(out, counts):
        assert torch.isfinite(row).all() and row[:n].abs().sum(-1).gt(0).all()
        assert not row[n:].any()  # outputs past an image's count are zeros


# ----------------------------------------------------------------------------- independence


@pytest.mark.parametrize("kind", KINDS)
def test_image_alone_equals_image_in_batch(kind):
    conn = make_connector(kind)
    feats = padded(GRIDS)
    with torch.no_grad():
        batched = conn(feats, GRIDS)
        for i, ((r, c), n) in enumerate(zip(GRIDS, EXPECTED[kind])):
            alone = conn(feats[i : i + 1, : r * c], [(r, c)])  # no padding, no other images
            assert alone.shape == (1, n, WIDTH)
            close(batched[i, :n], alone[0])
        # The check can fail: new real features for image 1 change image 1's tokens and only them.
        changed = feats.clone()
        changed[1, :12] = torch.randn(12, WIDTH)
        after = conn(changed, GRIDS)
    assert (after[1] - batched[1]).abs().max() > 1e-2
    close(after[[0, 2, 3]], batched[[0, 2, 3]])


@pytest.mark.parametrize("kind", KINDS)
def test_padding_values_do_not_matter(kind):
    conn = make_connector(kind)
    zeros, noise = padded(GRIDS, fill="zeros"), padded(GRIDS, fill="noise")
    assert not torch.equal(zeros, noise)
    with torch.no_grad():
        close(conn(noise, GRIDS), conn(zeros, GRIDS))


# ----------------------------------------------------------------------------- in the model


def connector_model(kind: str, fusion: str, tokenizer, seed: int = 0):
    config = tiny_config(fusion)
    config.model.connector.kind = kind
    config.model.connector.num_tokens = NUM_TOKENS[kind]
    torch.manual_seed(seed)
    return build_model(config, tokenizer).eval()


@pytest.mark.parametrize("fusion", ["unified", "cross_attention"])
@pytest.mark.parametrize("kind", KINDS)
def test_model_forward_backward(kind, fusion, tokenizer, make_batch, forward):
    model = connector_model(kind, fusion, tokenizer)
    n = NUM_TOKENS[kind]
    assert model.connector.num_tokens == n
    assert model.tokens_per_image == (n if fusion == "unified" else 1)  # one marker for cross-attention
    batch = make_batch(model, MIXED)
    assert batch.num_images >= 5
    assert int((batch.input_ids == model.ids.image).sum()) == batch.num_images * model.tokens_per_image
    if fusion == "cross_attention":  # closed gates give the image path exactly zero gradient
        with torch.no_grad():
            for block in model.cross_blocks.values():
                block.attn_gate.fill_(0.5)
                block.ffn_gate.fill_(0.5)
    out = forward(model, batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    params = dict(model.connector.named_parameters())
    assert params
    dead = [name for name, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("kind", KINDS)
def test_steps_on_one_batch_lower_the_loss(kind, tokenizer, make_batch, forward, overfit):
    batch_items = [("color", 0), ("color", 1), ("price", 0)]
    # The whole model, as training runs it.
    model = connector_model(kind, "unified", tokenizer)
    before = {n: p.detach().clone() for n, p in model.connector.named_parameters()}
    losses = overfit(model, make_batch(model, batch_items), steps=15)
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(not torch.equal(before[n], p) for n, p in model.connector.named_parameters())
    # The connector alone (an alignment stage): a random LLM reads little from the image tokens,
    # so the drop is small, but it is zero when the connector's outputs do not reach the loss.
    model = connector_model(kind, "unified", tokenizer)
    batch = make_batch(model, batch_items)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p.requires_grad_(True) for p in model.connector.parameters()], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = forward(model, batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03, losses


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kind", KINDS)
def test_bad_num_tokens_names_the_key(kind, tokenizer):
    config = tiny_config("unified")
    config.model.connector.kind = kind
    config.model.connector.num_tokens = 0
    with pytest.raises(ConfigError, match=r"model\.connector\.num_tokens"):
        build_model(config, tokenizer)


@pytest.mark.parametrize("kind,key,value", [
    ("cabstractor", "depth", 0), ("perceiver", "depth", 0), ("qformer", "depth", 0),
    ("perceiver", "num_heads", 0), ("qformer", "num_heads", 0), ("avgpool", "hidden_size", 0),
    ("perceiver", "num_heads", 5), ("qformer", "num_heads", 3),  # do not divide the width 32
    ("qformer", "hidden_size", 30),  # 30 is not a multiple of 4 heads
])
def test_bad_values_name_the_key(kind, key, value):
    checked = "num_heads" if key == "hidden_size" and kind == "qformer" else key
    with pytest.raises(ConfigError, match=rf"model\.connector\.{checked}"):
        make_connector(kind, **{key: value})
