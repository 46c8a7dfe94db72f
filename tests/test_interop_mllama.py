"""Llama 3.2 Vision import/export: fusionlm's numbers equal transformers' MllamaForConditionalGeneration.

A tiny random checkpoint (two cross-attention layers, up to 4 tiles of 16 px, non-zero gates) is
written here with ``save_pretrained``; nothing is downloaded.
Processors are loaded on their Pillow backend, the one fusionlm runs (transformers' own default
when torchvision is not installed; see experiments/device_check.py for how far its torchvision
backend differs).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from transformers import MllamaForConditionalGeneration, MllamaProcessor

from fusionlm.checkpoint import load_model, save_model
from fusionlm.cli import main
from fusionlm.data.chat import encode
from fusionlm.data.pixels.processing import ImageBatch, ImageSpec
from fusionlm.errors import ConfigError, ExportError
from fusionlm.generate import Request, generate_ids, left_pad
from fusionlm.interop import export_checkpoint, import_checkpoint
from hf_tiny import import_pair, noise_images
from hf_tiny_mllama import mllama_checkpoint

# (prompt, images): one image cut into 2 tiles, two separated images (text sees only the latest),
# two adjacent images (one group: both stay visible), a 4-tile image, and text only.
PROMPTS = [
    ("<image>\nWhat color is the square?", [0]),
    ("Compare <image> with <image>, how many shapes?", [1, 2]),
    ("<image><image>Describe both.", [2, 0]),
    ("<image> the answer is", [3]),
    ("Describe the image in one sentence.", []),
]
TEXT_ONLY = [("Describe the image in one sentence.", []), ("What color is the square? The square is", [])]
TOL = 1e-4
MAX_NEW = 8


def quiet(*_):
    pass


def pictures() -> list[Image.Image]:
    return noise_images([(40, 20), (15, 12), (18, 45), (60, 64)])  # (width, height): 1x2, 1x1, 3x1, 2x2 tiles


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, its processor, our model, tokenizer, config, source dir, our dir)."""
    tmp = tmp_path_factory.mktemp("mllama")
    return import_pair(tmp, mllama_checkpoint(tmp / "src"), MllamaForConditionalGeneration, MllamaProcessor)


def chat_text(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt.replace("<image>", "<|image|>")}],
                                         tokenize=False, add_generation_prompt=True)


def processor_inputs(processor, tokenizer, prompts=PROMPTS):
    imgs = pictures()
    images = [[imgs[i] for i in which] for _, which in prompts]
    return processor(text=[chat_text(tokenizer, p) for p, _ in prompts],
                     images=images if any(images) else None, padding=True, padding_side="left", return_tensors="pt")


def requests(prompts=PROMPTS) -> list[Request]:
    imgs = pictures()
    return [Request(p, [imgs[i] for i in which]) for p, which in prompts]


def our_images(model, inputs) -> ImageBatch | None:
    """The processor's real images (row-major, padding images dropped) as fusionlm's ImageBatch."""
    if "pixel_values" not in inputs:
        return None
    counts = (inputs["input_ids"] == model.ids.image).sum(1).tolist()
    pick = [(b, j) for b, n in enumerate(counts) for j in range(n)]
    rows, cols = torch.tensor([b for b, _ in pick]), torch.tensor([j for _, j in pick])
    return ImageBatch(inputs["pixel_values"][rows, cols], [model.encoder.grid] * len(pick),
                      {"aspect_ratio_ids": inputs["aspect_ratio_ids"][rows, cols],
                       "aspect_ratio_mask": inputs["aspect_ratio_mask"][rows, cols]})


def our_logits(model, inputs):
    with torch.no_grad():
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     pixel_values=our_images(model, inputs)).logits


def max_diff(ours, theirs, inputs) -> float:
    real = inputs["attention_mask"].bool()
    return float((ours - theirs)[real].abs().max())


def hf_generate(hf, inputs, model, n=MAX_NEW):
    out = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=model.ids.end,
                      pad_token_id=model.ids.pad, suppress_tokens=[model.ids.image])
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(model.ids.end)] if model.ids.end in row else row)
    return rows


def test_our_pixels_are_the_processors(pair):
    hf, processor, model, tokenizer, config, *_ = pair
    spec = ImageSpec.for_model(model, config)
    tiles = set()
    for img in pictures():
        theirs = processor.image_processor(images=[[img]], return_tensors="pt")
        ours = spec.process(img)
        assert torch.equal(ours.pixels, theirs["pixel_values"][0, 0])
        assert torch.equal(ours.extras["aspect_ratio_ids"], theirs["aspect_ratio_ids"][0, 0])
        assert torch.equal(ours.extras["aspect_ratio_mask"], theirs["aspect_ratio_mask"][0, 0])
        tiles.add(int(ours.extras["aspect_ratio_mask"].sum()))
    assert tiles == {1, 2, 3, 4}


def test_our_token_ids_and_cross_attention_mask_are_the_processors(pair):
    """Token for token, and which tiles each token sees (Mllama's per-(token, image, tile) mask)."""
    hf, processor, model, tokenizer, config, *_ = pair
    spec = ImageSpec.for_model(model, config)
    rows, inputs = [], []
    for req in requests():
        got = [spec.process(i) for i in req.images]
        ids = encode(req.sample(), tokenizer, [model.layout.tokens(i.grid) for i in got], max_length=512,
                     image_token=config.model.tokenizer.image_token, add_generation_prompt=True).input_ids
        alone = processor(text=[chat_text(tokenizer, req.prompt)], images=[req.images] if req.images else None)
        assert ids == list(alone["input_ids"][0])
        rows.append(ids)
        inputs.extend(got)
    theirs = processor_inputs(processor, tokenizer)
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    assert torch.equal(ids, theirs["input_ids"]) and torch.equal(mask, theirs["attention_mask"])
    with torch.no_grad():
        cross = model.encode_images(ImageBatch.collate(inputs), ids).cross
    visible = cross.for_call(ids.shape[1]).visible  # (B, T, S)
    per_tile = model.encoder.grid[1]
    expected = theirs["cross_attention_mask"].flatten(2).repeat_interleave(per_tile, dim=2).bool()  # (B, T, S)
    assert torch.equal(visible, expected)


@pytest.mark.parametrize("prompts", [PROMPTS, TEXT_ONLY], ids=["mixed-batch", "text-only-batch"])
def test_imported_logits_match_transformers(pair, prompts):
    """Left-padded batches: rows with 0, 1 or 2 images (the others padded with blank images)."""
    hf, processor, model, tokenizer, *_ = pair
    inputs = processor_inputs(processor, tokenizer, prompts)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert max_diff(our_logits(model, inputs), theirs, inputs) <= TOL


@pytest.mark.parametrize("case", range(len(PROMPTS)))
def test_each_prompt_alone_matches_transformers(pair, case):
    hf, processor, model, tokenizer, *_ = pair
    inputs = processor_inputs(processor, tokenizer, PROMPTS[case:case + 1])
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert max_diff(our_logits(model, inputs), theirs, inputs) <= TOL


def test_packed_prompts_keep_to_their_own_images(pair):
    """All the prompts packed into one row (segments): each prompt's logits are its logits alone
    (its images only, seen by Llama 3.2 Vision's own cross-attention layers, and 'latest' visibility)."""
    hf, processor, model, tokenizer, *_ = pair
    alone = [processor_inputs(processor, tokenizer, [p]) for p in PROMPTS]
    ids = torch.cat([a["input_ids"][0] for a in alone])[None]  # (1, ΣT)
    segments = torch.cat([torch.full((a["input_ids"].shape[1],), s) for s, a in enumerate(alone, 1)])[None]
    parts = [our_images(model, a) for a in alone if "pixel_values" in a]
    pixels = ImageBatch(torch.cat([p.pixel_values for p in parts]), [g for p in parts for g in p.grids],
                        {k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras})
    with torch.no_grad():
        packed = model(ids, pixel_values=pixels, segment_ids=segments).logits[0]  # (ΣT, V)
    for s, a in enumerate(alone, 1):
        torch.testing.assert_close(packed[segments[0] == s], our_logits(model, a)[0], atol=TOL, rtol=TOL)


def test_images_change_the_logits(pair):
    """The comparisons are not vacuous: blank pixels move the logits far beyond TOL."""
    hf, processor, model, tokenizer, *_ = pair
    inputs = processor_inputs(processor, tokenizer, PROMPTS[:1])
    images = our_images(model, inputs)
    blank = ImageBatch(torch.zeros_like(images.pixel_values), images.grids, images.extras)
    with torch.no_grad():
        blind = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=blank).logits
    assert max_diff(our_logits(model, inputs), blind, inputs) > 100 * TOL


def test_imported_greedy_generation_matches_transformers(pair):
    hf, processor, model, tokenizer, config, *_ = pair
    spec = ImageSpec.for_model(model, config)
    ours = generate_ids(model, tokenizer, requests(), spec, max_new_tokens=MAX_NEW)
    assert ours == hf_generate(hf, processor_inputs(processor, tokenizer), model)
    assert sum(len(row) for row in ours) > len(ours)
    # A batch without any image: no cross-attention states at all, the cross layers are skipped.
    assert generate_ids(model, tokenizer, requests(TEXT_ONLY), spec, max_new_tokens=MAX_NEW) == \
        hf_generate(hf, processor_inputs(processor, tokenizer, TEXT_ONLY), model)


def test_export_round_trip_matches(pair, tmp_path):
    hf, processor, model, tokenizer, config, _, ours_dir = pair
    out = export_checkpoint(ours_dir, tmp_path / "mllama", "mllama", log=quiet)
    back = MllamaForConditionalGeneration.from_pretrained(out).eval()
    back_processor = MllamaProcessor.from_pretrained(out, backend="pil")
    inputs = processor_inputs(back_processor, tokenizer)
    reference = processor_inputs(processor, tokenizer)
    for key in reference:
        assert torch.equal(inputs[key], reference[key]), key
    with torch.no_grad():
        theirs = back(**inputs).logits
    assert max_diff(our_logits(model, inputs), theirs, inputs) <= TOL
    spec = ImageSpec.for_model(model, config)
    assert generate_ids(model, tokenizer, requests(), spec, max_new_tokens=MAX_NEW) == \
        hf_generate(back, inputs, model)


def test_cli_export(pair, tmp_path):
    *_, ours_dir = pair
    assert main(["export", str(ours_dir), str(tmp_path / "back"), "--format", "mllama"]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    assert (tmp_path / "back" / "processor_config.json").is_file()


@pytest.mark.parametrize("fusion", ["unified", "cross_attention", "fuyu"])
def test_a_model_that_does_not_fit_mllama_is_refused(fusion, make_model, tokenizer, tiny_config, tmp_path):
    save_model(make_model(fusion), tokenizer, tiny_config(fusion), tmp_path / "ckpt")
    with pytest.raises(ExportError, match="cannot export as mllama: ") as err:
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", "mllama", log=quiet)
    message = str(err.value)
    if fusion == "cross_attention":  # fusionlm's own gated blocks on a Llama
        assert "fusionlm's own gated cross-attention blocks" in message
        assert "visibility is 'preceding'" in message
    else:
        assert f"fusion is {fusion!r}" in message
    assert "the encoder is" in message and "the image token is '<image>'" in message
    assert not (tmp_path / "out").exists()


def test_an_imported_model_with_another_visibility_is_refused(pair, tmp_path):
    *_, ours_dir = pair
    model, tokenizer, config = load_model(ours_dir)
    config.model.fusion.visibility = "preceding"
    save_model(model, tokenizer, config, tmp_path / "ckpt")
    with pytest.raises(ExportError, match="^cannot export as mllama: fusion visibility is 'preceding'[^;]*$"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", "mllama", log=quiet)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_its_image_processor_is_refused(pair, tmp_path):
    *_, src, _ = pair
    bare = tmp_path / "bare"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("processor_config.json", "preprocessor_config.json"))
    with pytest.raises(ConfigError, match="needs its MllamaImageProcessor settings"):
        import_checkpoint(str(bare), tmp_path / "ours", log=quiet)
    assert not (tmp_path / "ours").exists()
