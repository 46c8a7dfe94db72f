"""Resolution: native-resolution images through a Qwen2-VL vision tower (2D RoPE, 2x2 merging,
transformers' Qwen2-VL image processor), and CLIP / SigLIP towers used above their own size by
interpolating their position embeddings (MM1's 378 -> 672)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionlm.checkpoint import build_model, load_model
from fusionlm.config import RecipeConfig, from_dict, validate
from fusionlm.data.batching.batches import collate
from fusionlm.data.chat import encode
from fusionlm.data.pixels.processing import ImageBatch, ImageSpec, hf_image_processor
from fusionlm.data.prompt import Prompted
from fusionlm.data.sample import Sample
from fusionlm.encoders import build_encoder
from fusionlm.errors import ConfigError
from fusionlm.train.loop import train
from helpers_train import read_metrics, stage, tiny_dict
from hf_tiny import noise_images, tower_checkpoint

PATCH, MERGE = 4, 2
MIN_PIXELS, MAX_PIXELS = 16 * 16, 64 * 64
PROC = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2}
QWEN = {"kind": "qwen2vl", "image_size": 32, "patch_size": PATCH, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "intermediate_size": 64, "preprocess": "hf", "processor": PROC}


def quiet(*_args, **_kw) -> None:
    pass


def qwen_dict(fusion: str = "unified", **encoder) -> dict:
    data = tiny_dict()
    data["model"]["encoder"] = {**QWEN, "processor": dict(PROC), **encoder}
    data["model"]["fusion"] = {"kind": fusion, "every_n": 1}
    return data


def qwen_config(fusion: str = "unified", **encoder) -> RecipeConfig:
    return validate(from_dict(qwen_dict(fusion, **encoder)))


def their_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH,
                                    merge_size=MERGE, temporal_patch_size=2)


@pytest.fixture(scope="module")
def qwen(tokenizer):
    """(config, model, spec) of a tiny unified model with a random qwen2vl tower."""
    torch.manual_seed(0)
    config = qwen_config()
    model = build_model(config, tokenizer).eval()
    return config, model, ImageSpec.for_model(model, config)


# ----------------------------------------------------------------------------- native resolution


def test_token_count_follows_each_images_size_and_aspect(qwen):
    config, model, spec = qwen
    images = noise_images([(64, 32), (32, 64), (48, 48)])  # (width, height)
    inputs = [spec.process(img) for img in images]
    assert [i.grid for i in inputs] == [(4, 8), (8, 4), (6, 6)]  # rows, cols of merged tokens
    theirs = their_processor()(images=images, return_tensors="pt")
    counts = [int(thw.prod()) // MERGE**2 for thw in theirs["image_grid_thw"]]
    assert counts == [32, 32, 36] == [r * c for r, c in (i.grid for i in inputs)]
    assert torch.equal(torch.cat([i.pixels for i in inputs]), theirs["pixel_values"])
    assert [len(model.layout.tokens(i.grid)) for i in inputs] == counts
    batch = ImageBatch.collate(inputs)
    with torch.no_grad():
        feats = model.encoder(batch)
    assert feats.shape == (3, 36, model.encoder.out_dim) and model.encoder.out_dim == 32  # the merger's width
    assert feats[0, 32:].abs().sum() == 0 and feats[0, :32].abs().sum(-1).gt(0).all()  # zero-padded past 32


def test_an_image_within_the_bounds_is_not_resized(qwen):
    _, model, spec = qwen
    (img,) = noise_images([(48, 32)], seed=1)
    inp = spec.process(img)
    theirs = their_processor()(images=[img], return_tensors="pt")
    assert inp.extras["grid_thw"].tolist() == theirs["image_grid_thw"][0].tolist() == [1, 32 // PATCH, 48 // PATCH]
    assert inp.grid == (32 // PATCH // MERGE, 48 // PATCH // MERGE)
    assert torch.equal(inp.pixels, theirs["pixel_values"])
    # the patches are the image's own pixels, only normalised (no resampling), cut as the tower reads them
    raw = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = torch.tensor(model.encoder.mean)[:, None, None], torch.tensor(model.encoder.std)[:, None, None]
    patches, thw = model.encoder.patchify(((raw - mean) / std)[None])
    assert thw.tolist() == [[1, 8, 12]]
    assert torch.allclose(inp.pixels, patches, atol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (16, 8), (200, 100), (90, 30)])
def test_images_outside_the_bounds_are_scaled_into_them(qwen, size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    _, _, spec = qwen
    (img,) = noise_images([size])
    inp = spec.process(img)
    _, h, w = inp.extras["grid_thw"].tolist()
    pixels = h * w * PATCH * PATCH
    assert MIN_PIXELS <= pixels <= MAX_PIXELS and pixels != size[0] * size[1]
    assert (h * PATCH, w * PATCH) == smart_resize(size[1], size[0], PATCH * MERGE, MIN_PIXELS, MAX_PIXELS)
    assert abs((w / h) - size[0] / size[1]) / (size[0] / size[1]) < 0.35  # the aspect is about kept
    assert inp.grid == (h // MERGE, w // MERGE) and inp.pixels.shape == (h * w, 3 * 2 * PATCH * PATCH)


def test_a_pretrained_qwen2vl_tower_gives_transformers_features(tmp_path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, patch_size=PATCH, mlp_ratio=2)
    text = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2]})
    torch.manual_seed(0)
    full = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    their_processor().save_pretrained(tmp_path)
    config = qwen_config(hf=str(tmp_path), processor=None)
    encoder = build_encoder(config.model.encoder).eval()
    assert config.model.encoder.processor["patch_size"] == PATCH  # recorded from the checkpoint
    assert encoder.out_dim == 48 and config.model.encoder.arch["model_type"] == "qwen2_vl_vision"
    images = noise_images([(64, 32), (24, 40)], seed=2)
    spec = ImageSpec(size=32, mean=encoder.mean, std=encoder.std, hf=hf_image_processor(config.model.encoder.processor))
    batch = ImageBatch.collate([spec.process(i) for i in images])
    theirs = their_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        ours = encoder(batch)
        ref = full.model.visual(theirs["pixel_values"], grid_thw=theirs["image_grid_thw"]).pooler_output
    counts = batch.token_counts()
    assert counts == [int(t.prod()) // MERGE**2 for t in theirs["image_grid_thw"]] == [32, 15]
    assert torch.allclose(torch.cat([f[:c] for f, c in zip(ours, counts)]), ref, atol=1e-5)
    # feature_layer: the merger applied to that layer's hidden states
    config.model.encoder.feature_layer = -2
    earlier = build_encoder(config.model.encoder).eval()
    with torch.no_grad():
        hidden = full.model.visual(theirs["pixel_values"], grid_thw=theirs["image_grid_thw"],
                                   output_hidden_states=True).hidden_states[-2]
        ref = full.model.visual.merger(hidden)
        ours = earlier(batch)
    assert torch.allclose(torch.cat([f[:c] for f, c in zip(ours, counts)]), ref, atol=1e-5)


# ----------------------------------------------------------------------------- mixed sizes in a batch


def make_batch(model, config, tokenizer, samples):
    spec = ImageSpec.for_model(model, config)
    prompted = []
    for s in samples:
        inputs = [spec.process(img) for img in s.images]
        prompted.append(Prompted(encode(s, tokenizer, [model.layout.tokens(i.grid) for i in inputs],
                                        max_length=config.model.llm.max_length,
                                        end_token=config.model.tokenizer.end_token), inputs))
    return collate(prompted, [s.task for s in samples], [], tokenizer.pad_token_id)


def sample(name: str, image) -> Sample:
    return Sample(id=name, task="t", messages=[{"role": "user", "content": "<image>\nWhat color is the shape?"},
                                               {"role": "assistant", "content": "red"}], images=[image])


@pytest.mark.parametrize("fusion", ["unified", "cross_attention"])
def test_a_batch_mixing_sizes_never_shows_the_padding(fusion, tokenizer):
    torch.manual_seed(0)
    config = qwen_config(fusion)
    model = build_model(config, tokenizer).eval()
    for block in model.cross_blocks.values():  # open the gates: the images reach the text
        torch.nn.init.constant_(block.attn_gate, 1.0)
        torch.nn.init.constant_(block.ffn_gate, 1.0)
    small, big, other = noise_images([(32, 32), (64, 48), (32, 32)], seed=3)
    alone = make_batch(model, config, tokenizer, [sample("a", small)])
    mixed = make_batch(model, config, tokenizer, [sample("a", small), sample("b", big)])
    changed = make_batch(model, config, tokenizer, [sample("a", other)])
    assert mixed.pixels.token_counts() == [16, 48] and mixed.pixels.pixel_values.shape[0] == 64 + 192

    def logits(batch):
        with torch.no_grad():
            return model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).logits

    n = int(alone.attention_mask.sum())
    a, m = logits(alone)[0], logits(mixed)[0, :n]
    assert torch.allclose(a, m, atol=1e-5), (a - m).abs().max()
    assert not torch.allclose(a, logits(changed)[0], atol=1e-3)  # the image does reach the text
    if fusion == "unified":  # the image's tokens themselves
        feats_alone = model.image_features(alone.pixels)[0]
        feats_mixed = model.image_features(mixed.pixels)[0, :16]
        assert torch.allclose(feats_alone, feats_mixed, atol=1e-5)


def test_a_few_training_steps_lower_the_loss_and_the_model_reloads(tmp_path):
    data = qwen_dict()
    data["stages"] = [stage("s", steps=24, warmup_steps=3, mixture={"color": 1, "shape": 1, "text": 1})]
    train(from_dict(data), tmp_path / "run", log=quiet)
    rows = read_metrics(tmp_path / "run")
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - 0.5, (first, last)
    model, tokenizer, config = load_model(tmp_path / "run")
    assert config.model.encoder.kind == "qwen2vl" and config.model.encoder.processor["max_pixels"] == MAX_PIXELS
    inp = ImageSpec.for_model(model, config).process(noise_images([(64, 32)])[0])
    assert inp.grid == (4, 8)


# ----------------------------------------------------------------------------- position-embedding interpolation


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_an_interpolated_tower_matches_transformers_at_twice_its_size(kind, tmp_path, tokenizer):
    from transformers import CLIPVisionModel, SiglipVisionModel

    tower_dir = tower_checkpoint(tmp_path / kind, kind, image_size=16)  # 8 px patches: 2x2 = 4 tokens
    data = tiny_dict()
    data["model"]["encoder"] = {"kind": kind, "hf": str(tower_dir)}
    own = build_encoder(validate(from_dict(data)).model.encoder)
    assert own.grid == (2, 2) and own.image_size == 16
    data["model"]["encoder"]["resolution"] = 32
    config = validate(from_dict(data))
    model = build_model(config, tokenizer).eval()
    assert model.encoder.grid == (4, 4) and model.tokens_per_image == 16
    spec = ImageSpec.for_model(model, config)
    assert spec.size == 32
    images = noise_images([(40, 24), (32, 32)], seed=4)
    inputs = [spec.process(i) for i in images]
    assert inputs[0].pixels.shape == (3, 32, 32) and inputs[0].grid == (4, 4)
    pixels = torch.stack([i.pixels for i in inputs])
    reference = (CLIPVisionModel if kind == "clip" else SiglipVisionModel).from_pretrained(tower_dir).eval()
    with torch.no_grad():
        ours = model.encoder(ImageBatch.collate(inputs))
        out = reference(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    theirs = out.hidden_states[-1]  # feature_layer -1 (before SigLIP's post-layernorm)
    if kind == "clip":
        theirs = theirs[:, 1:]  # the CLS token is dropped
    assert ours.shape == (2, 16, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("encoder, message", [
    ({"processor": None}, r"model\.encoder\.processor: the qwen2vl encoder .* needs the image processor's settings"),
    ({"processor": {**PROC, "patch_size": 8}}, r"model\.encoder\.processor\.patch_size: 8, but the tower's is 4"),
    ({"processor": {k: v for k, v in PROC.items() if k != "max_pixels"}}, r"model\.encoder\.processor\.max_pixels: missing"),
    ({"processor": {**PROC, "merge_size": True}}, r"model\.encoder\.processor\.merge_size: expected a positive int"),
    ({"processor": {**PROC, "min_pixels": 9000}}, r"model\.encoder\.processor\.min_pixels: 9000 is more than max_pixels"),
    ({"processor": {**PROC, "max_pixels": 32}}, r"model\.encoder\.processor\.max_pixels: 32 is less than one merged patch"),
    ({"processor": {**PROC, "image_processor_type": "SiglipImageProcessor"}},
     r"model\.encoder\.processor\.image_processor_type: 'SiglipImageProcessor'"),
    ({"intermediate_size": 48}, r"model\.encoder\.intermediate_size: .* whole multiple"),
    ({"preprocess": "letterbox", "image_size": 36}, r"model\.encoder\.image_size: 36 is not a multiple .* 8"),
    ({"resolution": 64}, r"model\.encoder\.resolution: the 'qwen2vl' encoder cannot interpolate"),
    ({"kind": "siglip", "preprocess": "letterbox", "processor": None, "resolution": 30},
     r"model\.encoder\.resolution: 30 is not a positive multiple of the tower's patch size 4"),
    ({"kind": "siglip", "processor": None, "resolution": 32, "preprocess": "hf"},
     r"model\.encoder\.resolution: images are letterboxed .* set preprocess: letterbox"),
])
def test_bad_settings_are_config_errors_naming_the_key(encoder, message):
    config = qwen_config(**encoder)
    with pytest.raises(ConfigError, match=message):
        build_encoder(config.model.encoder)


def test_processor_patch_sizes_not_given_are_the_towers():
    config = qwen_config(patch_size=8, processor={k: v for k, v in PROC.items() if k not in ("patch_size", "merge_size")})
    build_encoder(config.model.encoder)
    settings = config.model.encoder.processor
    assert (settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]) == (8, 2, 2)
    (img,) = noise_images([(64, 32)])
    assert ImageSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, hf=hf_image_processor(settings)).process(img).grid == (2, 4)


def test_a_letterboxed_qwen2vl_image_is_read_like_the_processors_patches(qwen, tokenizer):
    """With ``preprocess: letterbox`` the tower cuts the square image itself, exactly as the
    processor would: the same features as the flat patches of that image."""
    config, model, spec = qwen
    letterbox = ImageSpec(size=32, mean=model.encoder.mean, std=model.encoder.std, grid=model.encoder.grid)
    (img,) = noise_images([(32, 32)], seed=5)
    square = letterbox.process(img)
    flat = spec.process(img)
    assert square.pixels.shape == (3, 32, 32) and square.grid == flat.grid == model.encoder.grid
    with torch.no_grad():
        a = model.encoder(ImageBatch.collate([square]))
        b = model.encoder(ImageBatch.collate([flat]))
    assert torch.allclose(a, b, atol=1e-5)
