"""Dynamic tiling (AnyRes / NVLM tiles) and the NVLM-H hybrid fusion."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fusionlm.checkpoint import build_model
from fusionlm.config import from_dict, validate
from fusionlm.errors import ConfigError
from fusionlm.data.pixels.tiling import cut_tiles, tile_grid
from fusionlm.data.prompt import PromptEncoder
from fusionlm.train.loop import Trainer
from helpers_train import tiny_dict
from hf_tiny import noise_images
from conftest import make_batch, spec_for, tiny_config


@pytest.mark.parametrize("size, grid", [
    ((64, 64), (2, 2)),   # square, enough pixels for 4 tiles
    ((20, 20), (1, 1)),   # square but small: not blown up
    ((128, 64), (1, 2)),  # 2:1
    ((64, 128), (2, 1)),  # 1:2
    ((200, 50), (1, 4)),  # 4:1
    ((90, 30), (1, 3)),   # 3:1
    ((300, 100), (1, 3)),
])
def test_tile_grid_follows_the_aspect_ratio(size, grid):
    assert tile_grid(*size, max_tiles=4, tile=32) == grid


def test_tile_grid_respects_the_bounds():
    assert tile_grid(400, 50, max_tiles=3, tile=32) == (1, 3)  # 8:1 wants more tiles than allowed
    assert tile_grid(20, 20, max_tiles=6, min_tiles=2, tile=32) == (2, 2)  # (1, 1) is below the minimum


def test_tiles_reassemble_the_image():
    (img,) = noise_images([(70, 40)])
    grid = tile_grid(img.width, img.height, max_tiles=6, tile=16)
    tiles = cut_tiles(img, grid, 16)
    rows, cols = grid
    assert len(tiles) == rows * cols and all(t.size == (16, 16) for t in tiles)
    canvas = Image.new("RGB", (cols * 16, rows * 16))
    for k, tile in enumerate(tiles):
        canvas.paste(tile, ((k % cols) * 16, (k // cols) * 16))
    assert canvas.tobytes() == img.resize((cols * 16, rows * 16), Image.Resampling.BICUBIC).tobytes()


def tiled_config(fusion: str, marker: str = "tags", max_tiles: int = 2):
    config = tiny_config("unified")
    config.model.fusion.kind = fusion
    config.model.tiling.max_tiles, config.model.tiling.marker = max_tiles, marker
    config.model.llm.max_length = 256
    return validate(config)


def tiled_model(tokenizer, fusion, marker="tags"):
    torch.manual_seed(0)
    return build_model(tiled_config(fusion, marker), tokenizer).eval()


@pytest.mark.parametrize("fusion, marker", [("unified", "tags"), ("unified", "newline"), ("unified", "none"),
                                            ("cross_attention", "tags"), ("hybrid", "tags")])
def test_layout_of_a_tiled_image(fusion, marker, tokenizer):
    model = tiled_model(tokenizer, fusion, marker)
    spec = spec_for(model)
    (img,) = noise_images([(64, 32)])  # 2:1 -> two tiles, then the thumbnail
    inputs = spec.process_all(img)
    assert [i.role for i in inputs] == ["tile", "tile", "thumbnail"]
    tokens = model.layout.image_tokens(inputs)
    n = model.encoder.num_tokens  # 16 per tile
    tags, image = model.ids.tile_tags, [model.ids.image]
    if (fusion, marker) == ("unified", "tags"):
        expected = list(tags[0]) + image * n + list(tags[1]) + image * n + list(tags[-1]) + image * n
    elif marker == "newline":
        expected = (image * n + [model.ids.newline]) * 3
    elif marker == "none":
        expected = image * 3 * n
    elif fusion == "cross_attention":
        expected = image * 3  # one marker per tile and for the thumbnail
    else:  # hybrid: only the thumbnail is in the sequence
        expected = list(tags[-1]) + image * n
    assert tokens == expected
    if marker == "tags":
        assert tokenizer.decode(tags[0]) == "<tile_1>" and tokenizer.decode(tags[-1]) == "<tile_global_thumbnail>"


@pytest.mark.parametrize("fusion", ["unified", "cross_attention", "hybrid"])
def test_tiled_batches_train(fusion, tokenizer, world):
    model = tiled_model(tokenizer, fusion).train()
    _open_gates(model)  # closed gates pass no gradient to what the blocks attend to
    samples = [world.sample(t, "train", i) for t, i in [("color", 0), ("price", 0), ("text_only", 0)]]
    batch = make_batch(model, tokenizer, samples)
    assert batch.pixels.roles.count("thumbnail") == 3  # three images, each tiles + thumbnail
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, labels=batch.labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.connector.linear_1.weight.grad.abs().sum() > 0
    assert model.encoder.tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert all(b.k_proj.weight.grad.abs().sum() > 0 for b in model.cross_blocks.values())


def _open_gates(model):
    for block in model.cross_blocks.values():
        torch.nn.init.constant_(block.attn_gate, 1.0)
        torch.nn.init.constant_(block.ffn_gate, 1.0)


def test_hybrid_tiles_are_seen_only_from_their_thumbnail_on(tokenizer, world):
    model = tiled_model(tokenizer, "hybrid")
    _open_gates(model)
    batch = make_batch(model, tokenizer, [world.sample("price", "train", 0)])  # two images
    roles = batch.pixels.roles
    thumbs = [i for i, r in enumerate(roles) if r == "thumbnail"]
    second_tile = thumbs[0] + 1  # the first tile of the second image
    image_positions = (batch.input_ids[0] == model.ids.image).nonzero().squeeze(1)
    second_start = int(image_positions[model.encoder.num_tokens])  # first thumbnail token of image 2
    other = batch.pixels.pixel_values.clone()
    other[second_tile] = torch.randn(other[second_tile].shape, generator=torch.Generator().manual_seed(0))
    changed_images = type(batch.pixels)(other, batch.pixels.grids, {}, roles)
    with torch.no_grad():
        a = model(batch.input_ids, pixel_values=batch.pixels).logits[0]
        b = model(batch.input_ids, pixel_values=changed_images).logits[0]
    changed = (a - b).abs().amax(-1) > 0
    assert not changed[:second_start].any()  # before image 2's thumbnail: its tiles are invisible
    assert changed[second_start:].all()


def test_hybrid_thumbnail_goes_into_the_sequence(tokenizer, world):
    model = tiled_model(tokenizer, "hybrid")  # gates closed: only the thumbnail can matter
    batch = make_batch(model, tokenizer, [world.sample("color", "train", 0)])
    thumb = batch.pixels.roles.index("thumbnail")
    first = int((batch.input_ids[0] == model.ids.image).nonzero()[0])
    other = batch.pixels.pixel_values.clone()
    other[thumb] += 0.5
    with torch.no_grad():
        a = model(batch.input_ids, pixel_values=batch.pixels).logits[0]
        b = model(batch.input_ids, pixel_values=type(batch.pixels)(other, batch.pixels.grids, {},
                                                                    batch.pixels.roles)).logits[0]
    changed = (a - b).abs().amax(-1) > 0
    assert not changed[:first].any() and changed[first:].all()


def test_hybrid_needs_tiles_with_a_thumbnail():
    with pytest.raises(ConfigError, match=r"hybrid .* model\.tiling\.max_tiles >= 1"):
        validate(from_dict({"model": {"fusion": {"kind": "hybrid"}}}))
    with pytest.raises(ConfigError, match=r"model\.tiling: the 'patches' encoder"):
        validate(from_dict({"model": {"fusion": {"kind": "fuyu"}, "encoder": {"kind": "patches"},
                                      "tiling": {"max_tiles": 2}}}))


def test_hybrid_recipe_trains_with_falling_loss(tmp_path):
    from helpers_train import read_metrics

    data = tiny_dict()
    data["model"]["fusion"] = {"kind": "hybrid", "every_n": 1}
    data["model"]["tiling"] = {"max_tiles": 2}
    data["model"]["llm"]["max_length"] = 256
    data["stages"][0].update(mixture={"color": 1}, steps=30, batch_size=4, lr=3e-3)
    Trainer(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None).run()
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if m.get("loss") is not None]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_thumbnail_from_two_shows_an_image_that_fits_one_tile_once(tokenizer, world):
    config = tiled_config("unified")
    config.model.tiling.thumbnail_from = 2
    torch.manual_seed(0)
    model = build_model(validate(config), tokenizer).eval()
    spec = spec_for(model)
    square, wide = noise_images([(16, 16), (32, 16)])
    (alone,) = spec.process_all(square)
    assert alone.role == "image"  # untiled: no tag, no thumbnail
    assert torch.equal(alone.pixels, spec.process(square).pixels)
    assert [i.role for i in spec.process_all(wide)] == ["tile", "tile", "thumbnail"]
    assert model.layout.image_tokens([alone]) == [model.ids.image] * model.encoder.num_tokens
    # a batch of both kinds: the contrastive objective compares the lone image and the thumbnail
    from fusionlm.train.objectives import whole_images

    batch = make_batch(model, tokenizer, [world.sample("color", "train", 0), world.sample("text", "train", 0)])
    assert batch.pixels.roles == ["image", "tile", "tile", "thumbnail"]
    whole = whole_images(batch.pixels)
    assert torch.equal(whole.pixel_values, batch.pixels.pixel_values[[0, 3]])


def test_thumbnail_from_is_checked():
    with pytest.raises(ConfigError, match=r"model\.tiling\.thumbnail_from: 3"):
        validate(from_dict({"model": {"tiling": {"max_tiles": 2, "thumbnail_from": 3}}}))
    with pytest.raises(ConfigError, match=r"hybrid .* thumbnail_from: 1"):
        validate(from_dict({"model": {"fusion": {"kind": "hybrid"}, "tiling": {"max_tiles": 2, "thumbnail_from": 2}}}))


@pytest.mark.parametrize("thumbnail_from", [1, 2])
def test_a_contrastive_stage_under_tiling_loads_whole_images_only(tmp_path, thumbnail_from):
    """Its loader cuts no tiles: each sample's one input is the image whole, the very pixels of
    the thumbnail (or lone image) the language stages see."""
    data = tiny_dict()
    data["model"]["tiling"] = {"max_tiles": 2, "thumbnail_from": thumbnail_from}
    data["model"]["llm"]["max_length"] = 256
    data["stages"][0].update(objective="contrastive", mixture={"text": 1, "color": 1}, batch_size=6,
                             train=["encoder", "connector"])
    config = validate(from_dict(data))
    trainer = Trainer(config, tmp_path / "run", log=lambda *_: None)
    batch = next(trainer._batches(0, config.stages[0], 0))
    assert batch.pixels.roles == [] and batch.pixels.pixel_values.shape[0] == 6
    from fusionlm.data.batching.batches import MixtureBatches

    tiled = MixtureBatches(trainer.source, config.stages[0].mixture, seed=config.train.seed, stage=0,
                           batch_size=6, prompts=PromptEncoder.of(trainer.model, trainer.tokenizer, trainer.spec))[0]
    assert "tile" in tiled.pixels.roles  # the same samples, tiled, as a language stage would load them
    whole = [i for i, r in enumerate(tiled.pixels.roles) if r in ("thumbnail", "image")]
    assert torch.equal(batch.pixels.pixel_values, tiled.pixels.pixel_values[whole])

    data["model"]["tiling"]["thumbnail"] = False  # the language stages see tiles only; this stage, whole images
    config = validate(from_dict(data))
    again = next(Trainer(config, tmp_path / "run2", log=lambda *_: None)._batches(0, config.stages[0], 0))
    assert again.pixels.roles == [] and torch.equal(again.pixels.pixel_values, batch.pixels.pixel_values)
