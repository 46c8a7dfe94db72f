"""Fuyu import/export: fusionlm's numbers equal transformers' FuyuForCausalLM and FuyuProcessor.

A tiny random checkpoint is written here with ``save_pretrained``; nothing is downloaded. Images
are of three sizes (wider than the canvas, smaller than it, taller than wide), so each gives its
own grid of patches.
Processors are loaded on their Pillow backend, the one fusionlm runs (transformers' own default
when torchvision is not installed; see experiments/device_check.py for how far its torchvision
backend differs).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import FuyuForCausalLM, FuyuImageProcessorPil, FuyuProcessor

from fusionlm.checkpoint import load_model, save_model
from fusionlm.data.chat import encode
from fusionlm.data.pixels.processing import ImageBatch, ImageSpec
from fusionlm.errors import ExportError
from fusionlm.generate import Request, generate_ids, left_pad
from fusionlm.interop import export_checkpoint, import_checkpoint
from hf_tiny import import_pair, noise_images
from hf_tiny_fuyu import CANVAS, PATCH, fuyu_checkpoint

PROMPTS = ["What color is the square?", "Describe the image in one sentence.", "How many shapes are there?"]
SIZES = [(80, 40), (30, 18), (24, 50)]  # (width, height): wider than the 48x32 canvas, inside it, tall
TOL = 1e-4


def quiet(*_):
    pass


@pytest.fixture(scope="module", autouse=True)
def patchify_takes_tensors():
    """transformers 5.23: FuyuProcessor asks its image processor for tensors, then hands them to
    FuyuImageProcessorPil.patchify_image, which reshapes with numpy-only calls. Without
    torchvision (the other backend) the processor cannot run at all; give it numpy, same values."""
    original = FuyuImageProcessorPil.patchify_image

    def patchify(self, image, patch_size=None):
        if torch.is_tensor(image):
            return torch.from_numpy(original(self, image.numpy(), patch_size))
        return original(self, image, patch_size)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FuyuImageProcessorPil, "patchify_image", patchify)
        yield


def pictures() -> list[Image.Image]:
    return noise_images(SIZES)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, its processor, our model, tokenizer, config, our dir)."""
    tmp = tmp_path_factory.mktemp("fuyu")
    hf, processor, model, tokenizer, config, _, ours = import_pair(tmp, fuyu_checkpoint(tmp / "src"), FuyuForCausalLM,
                                                                   FuyuProcessor)
    return hf, processor, model, tokenizer, config, ours


def processor_inputs(processor, prompts=PROMPTS, images=None):
    images = images or pictures()[: len(prompts)]
    return processor(text=list(prompts), images=images, return_tensors="pt", return_legacy_image_output=False)


def requests(prompts=PROMPTS) -> list[Request]:
    return [Request(p, [img]) for p, img in zip(prompts, pictures())]


def our_ids(model, tokenizer, config, req: Request) -> list[int]:
    spec = ImageSpec.for_model(model, config)
    grids = [spec.process(i).grid for i in req.images]
    return encode(req.sample(), tokenizer, [model.layout.tokens(g) for g in grids], max_length=512,
                  image_token=config.model.tokenizer.image_token, add_generation_prompt=True).input_ids


def our_logits(model, config, inputs, images):
    spec = ImageSpec.for_model(model, config)
    batch = ImageBatch(inputs["pixel_values"], [spec.process(i).grid for i in images])
    with torch.no_grad():
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=batch).logits


def hf_generate(hf, inputs, model, n=8):
    ids = model.ids
    out = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=ids.end, pad_token_id=ids.pad,
                      suppress_tokens=[ids.image, ids.newline])
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(ids.end)] if ids.end in row else row)
    return rows


def test_our_patches_and_grids_are_the_processors(pair):
    hf, processor, model, tokenizer, config, _ = pair
    spec = ImageSpec.for_model(model, config)
    canvas = (CANVAS["height"] // PATCH, CANVAS["width"] // PATCH)
    for img in pictures():
        ours = spec.process(img)
        theirs = processor_inputs(processor, PROMPTS[:1], [img])
        ids = theirs["input_ids"][0]
        assert torch.equal(ours.pixels, theirs["pixel_values"])
        rows, cols = ours.grid
        assert ours.grid != canvas and rows != cols  # neither the canvas nor square
        assert int((ids == model.ids.newline).sum()) == rows
        assert int((ids == model.ids.image).sum()) == rows * cols == ours.pixels.shape[0]


def test_our_token_ids_are_the_processors(pair):
    hf, processor, model, tokenizer, config, _ = pair
    for req in requests():
        theirs = processor_inputs(processor, [req.prompt], req.images)["input_ids"][0].tolist()
        assert our_ids(model, tokenizer, config, req) == theirs
        placed = Request(f"<image>{req.prompt}", req.images)  # the image placed by hand, no line break
        assert our_ids(model, tokenizer, config, placed) == theirs


def test_a_batch_is_left_padded_like_the_processors(pair):
    hf, processor, model, tokenizer, config, _ = pair
    ids, mask = left_pad([our_ids(model, tokenizer, config, r) for r in requests()], tokenizer.pad_token_id)
    theirs = processor_inputs(processor)
    assert mask.sum(1).unique().numel() == len(PROMPTS)  # three different lengths
    assert torch.equal(ids, theirs["input_ids"]) and torch.equal(mask, theirs["attention_mask"])


def test_imported_logits_match_transformers(pair):
    hf, processor, model, tokenizer, config, _ = pair
    inputs = processor_inputs(processor)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    ours = our_logits(model, config, inputs, pictures())
    real = inputs["attention_mask"].bool()
    assert (ours - theirs)[real].abs().max() <= TOL


def test_imported_greedy_generation_matches_transformers(pair):
    hf, processor, model, tokenizer, config, _ = pair
    ours = generate_ids(model, tokenizer, requests(), ImageSpec.for_model(model, config), max_new_tokens=8)
    assert ours == hf_generate(hf, processor_inputs(processor), model)
    assert all(len(row) > 0 for row in ours)


def test_export_round_trip_matches(pair, tmp_path):
    hf, processor, model, tokenizer, config, ours_dir = pair
    out = export_checkpoint(ours_dir, tmp_path / "fuyu", "fuyu", log=quiet)
    back = FuyuForCausalLM.from_pretrained(out).eval()
    inputs = processor_inputs(FuyuProcessor.from_pretrained(out, backend="pil"))
    reference = processor_inputs(processor)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(inputs[key], reference[key])
    with torch.no_grad():
        theirs = back(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (our_logits(model, config, inputs, pictures()) - theirs)[real].abs().max() <= TOL
    spec = ImageSpec.for_model(model, config)
    assert generate_ids(model, tokenizer, requests(), spec, max_new_tokens=8) == hf_generate(back, inputs, model)
    # and back again: the export imports to the same prompts
    again, again_tok, again_config = load_model(import_checkpoint(str(out), tmp_path / "again", log=quiet))
    rows = [our_ids(again, again_tok, again_config, r) for r in requests()]
    assert torch.equal(left_pad(rows, again_tok.pad_token_id)[0], reference["input_ids"])


@pytest.mark.parametrize("fusion", ["unified", "fuyu"])
def test_a_model_that_does_not_fit_fuyu_is_refused(fusion, make_model, tokenizer, tiny_config, tmp_path):
    save_model(make_model(fusion), tokenizer, tiny_config(fusion), tmp_path / "ckpt")
    with pytest.raises(ExportError, match="cannot export as fuyu: ") as err:
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", "fuyu", log=quiet)
    said = str(err.value)
    assert "the connector is 'mlp'" in said and "the image token is '<image>'" in said
    if fusion == "unified":
        assert "fusion is 'unified'" in said and "the encoder is 'siglip'" in said
    else:  # fusionlm's own Fuyu design: letterboxed images and its own tokens
        assert "not cut into patches by a FuyuImageProcessor" in said and "the newline token is" in said
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
