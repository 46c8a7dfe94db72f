"""The convolutional stem (``model.encoder.stem: conv``): stride-2 3x3 convolutions in place of a
fresh tower's linear patch embedding, the same token grid, saved and reloaded like any weight."""

from __future__ import annotations

import pytest
import torch

from fusionlm.checkpoint import build_model, load_model, save_model
from fusionlm.config import validate
from fusionlm.data.pixels.processing import ImageBatch
from fusionlm.encoders import ConvStem, build_encoder
from fusionlm.errors import ConfigError, ExportError
from fusionlm.interop import export_checkpoint
from hf_tiny import noise_images, tower_checkpoint


def stem_config(tiny_config, fusion: str = "unified", **encoder):
    config = tiny_config(fusion)
    config.model.encoder.stem = "conv"
    for key, value in encoder.items():
        setattr(config.model.encoder, key, value)
    return validate(config)


def pixels(spec, n: int = 3, seed: int = 0) -> ImageBatch:
    return ImageBatch.collate([spec.process(img) for img in noise_images([(20, 12), (16, 16), (9, 30)][:n], seed=seed)])


@pytest.mark.parametrize("patch, convs", [(2, 1), (4, 2), (16, 4)])
def test_a_stem_halves_the_image_down_to_the_patch_grid(patch, convs):
    stem = ConvStem(3, 24, patch)
    out = stem(torch.randn(2, 3, 4 * patch, 2 * patch))  # (2, 24, 4, 2)
    assert out.shape == (2, 24, 4, 2)
    conv = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert len(conv) == convs and all(c.stride == (2, 2) and c.kernel_size == (3, 3) for c in conv)
    assert conv[-1].out_channels == 24 and stem.weight is conv[0].weight


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_the_stem_replaces_the_patch_embedding_and_keeps_the_grid(kind, tiny_config, spec_for, tokenizer):
    torch.manual_seed(0)
    plain = build_model(tiny_config("unified"), tokenizer)
    config = stem_config(tiny_config, kind=kind)
    model = build_model(config, tokenizer).eval()
    assert model.encoder.grid == plain.encoder.grid == (4, 4)
    names = [n for n, _ in model.encoder.named_parameters() if "patch_embedding" in n]
    assert "tower.embeddings.patch_embedding.2.weight" in [n.split("vision_model.")[-1] for n in names]
    features = model.encoder(pixels(spec_for(model)))
    assert features.shape == (3, 16, 32) and torch.isfinite(features).all()


def test_a_stem_model_saves_and_reloads_to_the_same_features(tiny_config, spec_for, tokenizer, tmp_path):
    torch.manual_seed(1)
    config = stem_config(tiny_config)
    model = build_model(config, tokenizer).eval()
    save_model(model, tokenizer, config, tmp_path / "ckpt")
    again, _, saved = load_model(tmp_path / "ckpt")
    assert saved.model.encoder.stem == "conv"
    batch = pixels(spec_for(model))
    with torch.no_grad():
        assert torch.equal(model.image_features(batch), again.image_features(batch))


def test_the_stem_reads_a_glyph_wherever_it_sits(tiny_config, tokenizer):
    """Translation equivariance, the reason for the stem: a picture moved by one patch gives the
    stem's features moved by one grid cell (away from the zero-padded border)."""
    torch.manual_seed(2)
    stem = ConvStem(3, 32, 4).eval()
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 8:14, 6:12] = torch.rand(1, 3, 6, 6)
    moved = torch.roll(x, shifts=(4, 8), dims=(2, 3))
    with torch.no_grad():
        a, b = stem(x), stem(moved)  # (1, 32, 8, 8)
    inner = (..., slice(2, 6), slice(3, 6))  # grid cells whose receptive field misses the padded border
    assert torch.allclose(torch.roll(a, shifts=(1, 2), dims=(2, 3))[inner], b[inner], atol=1e-6)
    assert not torch.allclose(a[inner], b[inner], atol=1e-3)


@pytest.mark.parametrize("encoder, message", [
    ({"stem": "resnet"}, r"model\.encoder\.stem: 'resnet' is not one of \['patch', 'conv'\]"),
    ({"patch_size": 6, "image_size": 18}, r"model\.encoder\.stem: .* power of two >= 2, not 6"),
    ({"kind": "patches"}, r"model\.encoder\.stem: the 'patches' encoder has only its own patch embedding"),
])
def test_bad_stems_are_config_errors_naming_the_key(encoder, message, tiny_config):
    config = tiny_config("unified")
    config.model.encoder.stem = "conv"
    for key, value in encoder.items():
        setattr(config.model.encoder, key, value)
    with pytest.raises(ConfigError, match=message):
        build_encoder(config.model.encoder)


def test_a_pretrained_tower_keeps_its_own_patch_embedding(tiny_config, tmp_path):
    config = tiny_config("unified")
    config.model.encoder.hf = str(tower_checkpoint(tmp_path / "tower", "siglip", image_size=16))
    config.model.encoder.stem = "conv"
    with pytest.raises(ConfigError, match=r"model\.encoder\.stem: 'conv' .* the pretrained tower .* keeps its own"):
        build_encoder(config.model.encoder)
    config.model.encoder.hf = str(tmp_path / "not-downloaded")  # refused before any loading is tried
    with pytest.raises(ConfigError, match=r"model\.encoder\.stem: 'conv' .* the pretrained tower .* keeps its own"):
        build_encoder(config.model.encoder)


def test_a_stem_model_is_not_exported_as_llava(tiny_config, tokenizer, tmp_path):
    config = stem_config(tiny_config)
    save_model(build_model(config, tokenizer), tokenizer, config, tmp_path / "ckpt")
    with pytest.raises(ExportError, match=r"cannot export as llava: the tower's stem is 'conv'"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", "llava", log=lambda *a, **k: None)
    assert not (tmp_path / "out").exists()
