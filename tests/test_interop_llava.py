"""LLaVA import/export: fusionlm's numbers equal transformers' LlavaForConditionalGeneration.

Tiny random checkpoints are written here with ``save_pretrained``; nothing is downloaded.
Processors are loaded on their Pillow backend, the one fusionlm runs (transformers' own default
when torchvision is not installed; see experiments/device_check.py for how far its torchvision
backend differs).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from fusionlm.checkpoint import load_model, save_model
from fusionlm.cli import main
from fusionlm.data.chat import encode
from fusionlm.data.pixels.processing import ImageBatch, ImageSpec
from fusionlm.errors import ExportError
from fusionlm.generate import Request, generate_ids
from fusionlm.interop import export_checkpoint
from hf_tiny import assert_pixels_are_the_processors, import_pair, llava_checkpoint, noise_images

VARIANTS = {
    "clip-layer-2-default-gqa": dict(tower="clip", feature_layer=-2, strategy="default", kv_heads=2),
    "clip-layer-1-full-mha": dict(tower="clip", feature_layer=-1, strategy="full", kv_heads=4),
    "siglip-layer-2-full": dict(tower="siglip", feature_layer=-2, strategy="full", kv_heads=2),
}
PROMPTS = [("<image>\nWhat color is the square?", 1), ("Compare <image> with <image>, how many shapes?", 2),
           ("Describe the image in one sentence.", 0)]
TOL = 1e-4


def quiet(*_):
    pass


def pictures() -> list[Image.Image]:
    return noise_images([(40, 28), (24, 50)])  # (width, height): neither is square nor the tower's size


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, its processor, our model, tokenizer, config, source dir, our dir)."""
    tmp = tmp_path_factory.mktemp(request.param)
    return import_pair(tmp, llava_checkpoint(tmp / "src", **VARIANTS[request.param]), LlavaForConditionalGeneration,
                       LlavaProcessor)


def chat_text(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def processor_inputs(processor, tokenizer, prompts=PROMPTS):
    imgs = pictures()
    images = [imgs[i] for _, n in prompts for i in range(n)]
    return processor(text=[chat_text(tokenizer, p) for p, _ in prompts], images=images or None, padding=True,
                     padding_side="left", return_tensors="pt")


def requests(prompts=PROMPTS) -> list[Request]:
    imgs = pictures()
    return [Request(p, imgs[:n]) for p, n in prompts]


def our_logits(model, inputs):
    images = ImageBatch.of(inputs["pixel_values"], model.encoder.grid)
    with torch.no_grad():
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=images).logits


def hf_generate(hf, inputs, model, n=8):
    out = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=model.ids.end,
                      pad_token_id=model.ids.pad, suppress_tokens=[model.ids.image])
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        row = row[: row.index(model.ids.end)] if model.ids.end in row else row
        rows.append(row)
    return rows


def test_our_pixels_are_the_processors(pair):
    hf, processor, model, tokenizer, config, *_ = pair
    assert_pixels_are_the_processors(processor, model, config, pictures())


def test_our_token_ids_are_the_processors(pair):
    hf, processor, model, tokenizer, config, *_ = pair
    spec = ImageSpec.for_model(model, config)
    for req in requests():
        inputs = [spec.process(i) for i in req.images]
        ours = encode(req.sample(), tokenizer, [model.layout.tokens(i.grid) for i in inputs], max_length=512,
                      image_token=config.model.tokenizer.image_token, add_generation_prompt=True).input_ids
        theirs = processor(text=[chat_text(tokenizer, req.sample().messages[0]["content"])],
                           images=req.images or None)["input_ids"][0]
        assert ours == list(theirs)


def test_imported_logits_match_transformers(pair):
    hf, processor, model, tokenizer, *_ = pair
    inputs = processor_inputs(processor, tokenizer)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    ours = our_logits(model, inputs)
    real = inputs["attention_mask"].bool()
    assert (ours - theirs)[real].abs().max() <= TOL


def test_imported_greedy_generation_matches_transformers(pair):
    hf, processor, model, tokenizer, config, *_ = pair
    spec = ImageSpec.for_model(model, config)
    ours = generate_ids(model, tokenizer, requests(), spec, max_new_tokens=8)
    theirs = hf_generate(hf, processor_inputs(processor, tokenizer), model)
    assert ours == theirs
    assert any(len(row) > 0 for row in ours)


def test_export_round_trip_matches(pair, tmp_path):
    hf, processor, model, tokenizer, config, src, ours_dir = pair
    out = export_checkpoint(ours_dir, tmp_path / "llava", "llava", log=quiet)
    back = LlavaForConditionalGeneration.from_pretrained(out).eval()
    back_processor = LlavaProcessor.from_pretrained(out, backend="pil")
    inputs = back_processor(text=[chat_text(tokenizer, p) for p, _ in PROMPTS[:2]], images=pictures()[:1] + pictures(),
                            padding=True, padding_side="left", return_tensors="pt")
    reference = processor_inputs(processor, tokenizer, PROMPTS[:2])
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"])
    with torch.no_grad():
        theirs = back(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (our_logits(model, inputs) - theirs)[real].abs().max() <= TOL
    spec = ImageSpec.for_model(model, config)
    assert generate_ids(model, tokenizer, requests(), spec, max_new_tokens=8) == \
        hf_generate(back, processor_inputs(back_processor, tokenizer), model)


def test_a_fusionlm_model_exports_to_llava(make_model, tokenizer, tiny_config, make_batch, tmp_path):
    """A model assembled and trained in fusionlm (own tokenizer, letterboxed images) runs in transformers."""
    model = make_model("unified")
    torch.nn.init.normal_(model.connector.linear_2.weight, std=0.5)  # make the image matter
    save_model(model, tokenizer, tiny_config("unified"), tmp_path / "ckpt")
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "llava", "llava", log=quiet)
    back = LlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = make_batch(model, [("color", 0), ("price", 0)])
    with torch.no_grad():
        ours = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels).logits
        theirs = back(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      pixel_values=batch.pixels.pixel_values).logits
    real = batch.attention_mask.bool()
    assert (ours - theirs)[real].abs().max() <= TOL


@pytest.mark.parametrize("fusion", ["cross_attention", "fuyu"])
def test_a_model_that_does_not_fit_llava_is_refused(fusion, make_model, tokenizer, tiny_config, tmp_path):
    save_model(make_model(fusion), tokenizer, tiny_config(fusion), tmp_path / "ckpt")
    with pytest.raises(ExportError, match="cannot export as llava: fusion is"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", "llava", log=quiet)
    assert not (tmp_path / "out").exists()


def test_cli_import_and_export(tmp_path, capsys):
    src = llava_checkpoint(tmp_path / "src")
    assert main(["import", str(src), str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--format", "llava"]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    assert main(["import", str(tmp_path / "ours"), str(tmp_path / "again")]) == 2  # a fusionlm dir: no config.json
    assert "no transformers config.json here (it is a fusionlm checkpoint already)" in capsys.readouterr().err


def test_walkthrough_fine_tune_an_imported_llava_and_export_it_back(tmp_path, capsys):
    """README walk-through 1, command by command: import, own data, fine-tune, generate, export."""
    from helpers_train import weights

    src = llava_checkpoint(tmp_path / "llava-hf")
    assert main(["import", str(src), "--out", str(tmp_path / "llava")]) == 0
    assert main(["data", "--out", str(tmp_path / "mydata"), "--n", "4", "--tasks", "color", "shape",
                 "--image-size", "32"]) == 0
    assert main(["train", "finetune", "--init", str(tmp_path / "llava"), "--out", str(tmp_path / "ft"),
                 "--set", f"data.source={tmp_path / 'mydata' / 'data.json'}", "--set", "stages.0.steps=2",
                 "--set", "stages.0.batch_size=2", "--set", "stages.0.grad_accum=1", "--set", "stages.0.lr=1e-2"]) == 0
    before, after = weights(tmp_path / "llava"), weights(sorted((tmp_path / "ft" / "checkpoints").iterdir())[-1])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))  # frozen tower
    assert not torch.equal(before["connector.linear_1.weight"], after["connector.linear_1.weight"])
    image = tmp_path / "mydata" / "images" / sorted((tmp_path / "mydata" / "images").iterdir())[0].name
    assert main(["generate", "--checkpoint", str(tmp_path / "ft"), "--image", str(image), "--prompt",
                 "What color is it?", "--max-new-tokens", "3"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "ft"), "--out", str(tmp_path / "ft-hf"), "--format", "llava"]) == 0
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ft-hf").eval()
    model, tokenizer, _ = load_model(tmp_path / "ft")
    inputs = processor_inputs(LlavaProcessor.from_pretrained(tmp_path / "ft-hf", backend="pil"), tokenizer, PROMPTS[:1])
    with torch.no_grad():
        assert (back(**inputs).logits - our_logits(model, inputs)).abs().max() <= TOL


# ----------------------------------------------------------------------------- a checkpoint without a chat template


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A LLaVA checkpoint saved with no chat template, imported with the CLI as a new user would:
    (transformers model, its processor, source dir, our dir)."""
    tmp = tmp_path_factory.mktemp("no-template")
    src = llava_checkpoint(tmp / "src", chat_template=False)
    assert main(["import", str(src), str(tmp / "ours")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(src).eval()
    return hf, LlavaProcessor.from_pretrained(src, backend="pil"), src, tmp / "ours"


def plain_inputs(processor):
    """LLaVA-1.5 prompts written out by hand (there is no template), in the checkpoint's own tokens only."""
    texts = [f"USER: {p} ASSISTANT:" for p, _ in PROMPTS]
    imgs = pictures()
    inputs = processor(text=texts, images=[imgs[i] for _, n in PROMPTS for i in range(n)], padding=True,
                       padding_side="left", return_tensors="pt")
    assert inputs["input_ids"].max() < len(processor.tokenizer)
    return inputs


def test_import_without_a_chat_template_keeps_the_checkpoint_vocabulary(bare):
    hf, processor, _, ours_dir = bare
    model, tokenizer, _ = load_model(ours_dir)
    vocab, theirs = tokenizer.get_vocab(), processor.tokenizer.get_vocab()
    n = len(theirs)
    assert {t: vocab[t] for t in theirs} == theirs  # every token of the checkpoint keeps its id
    added = sorted((i, t) for t, i in vocab.items() if t not in theirs)
    assert [i for i, _ in added] == list(range(n, len(tokenizer)))  # fusionlm's template tokens come after
    assert {t for _, t in added} == {"<|user|>", "<|assistant|>", "<|system|>", "<|end|>"}
    for ours, source in [(model.llm.get_input_embeddings(), hf.get_input_embeddings()),
                         (model.llm.get_output_embeddings(), hf.get_output_embeddings())]:
        assert ours.weight.shape[0] == len(tokenizer)
        assert torch.equal(ours.weight[:n], source.weight)  # the checkpoint's rows, exactly
        assert ours.weight[n:].abs().sum() > 0  # the added rows are initialised, not left at zero


def test_import_without_a_chat_template_gives_transformers_logits(bare):
    hf, processor, _, ours_dir = bare
    model, *_ = load_model(ours_dir)
    inputs = plain_inputs(processor)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    ours = our_logits(model, inputs)
    real = inputs["attention_mask"].bool()
    assert (ours[..., : theirs.shape[-1]] - theirs)[real].abs().max() == 0.0


def test_export_without_a_chat_template_round_trips(bare, tmp_path):
    hf, processor, _, ours_dir = bare
    model, tokenizer, _ = load_model(ours_dir)
    out = export_checkpoint(ours_dir, tmp_path / "llava", "llava", log=quiet)
    back = LlavaForConditionalGeneration.from_pretrained(out).eval()
    n = hf.get_input_embeddings().weight.shape[0]
    assert torch.equal(back.get_input_embeddings().weight[:n], hf.get_input_embeddings().weight)
    assert torch.equal(back.get_output_embeddings().weight[:n], hf.get_output_embeddings().weight)
    inputs = plain_inputs(processor)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        again, theirs = back(**inputs).logits, hf(**inputs).logits
    assert (again - our_logits(model, inputs))[real].abs().max() == 0.0
    assert (again[..., :n] - theirs)[real].abs().max() == 0.0
    assert LlavaProcessor.from_pretrained(out).tokenizer.get_vocab() == tokenizer.get_vocab()
