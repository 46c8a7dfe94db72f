"""Janus import/export: fusionlm's numbers equal transformers' JanusForConditionalGeneration.

What is compared, on a tiny random checkpoint written here (fp32): the understanding logits of
prompts with and without pictures (a left-padded batch), the generation head's scores at every
position of a drawn picture (codes going in through Janus's embedding + aligner), the pixels that
``decode_image_tokens`` gives for the same codes, and all three again after ``fusionlm export``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

from fusionlm.data.pixels.processing import ImageBatch, ImageSpec
from fusionlm.errors import ExportError
from fusionlm.interop import export_checkpoint
from hf_tiny import assert_pixels_are_the_processors, import_pair, janus_checkpoint, noise_images

PROMPTS = [("<image>\nWhat color is the square?", 1), ("Describe the image in one sentence.", 0),
           ("Compare <image> with <image>.", 2)]  # fusionlm's placeholder; the processor's is Janus's own
DRAW = "A small blue circle next to a green triangle."


def quiet(*_):
    pass


def pictures():
    return noise_images([(40, 28), (24, 50)])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, its processor, our model, tokenizer, config, source dir, our dir)."""
    tmp = tmp_path_factory.mktemp("janus")
    return import_pair(tmp, janus_checkpoint(tmp / "src"), JanusForConditionalGeneration, JanusProcessor)


def chat(processor, prompt: str) -> str:
    prompt = prompt.replace("<image>", processor.image_token)
    return processor.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)


def reading_inputs(processor):
    imgs = pictures()
    images = [imgs[i] for _, n in PROMPTS for i in range(n)]
    return processor(text=[chat(processor, p) for p, _ in PROMPTS], images=images, padding=True,
                     padding_side="left", return_tensors="pt")


def drawing_inputs(processor, model, seed: int = 0):
    """A drawing prompt (ending in <begin_of_image>) and a picture's worth of random codes."""
    prompt = processor(text=[chat(processor, DRAW)], generation_mode="image", return_tensors="pt")["input_ids"]
    rows, cols = model.image_tokenizer.grid
    codes = torch.randint(0, model.image_tokenizer.codebook_size, (1, rows * cols),
                          generator=torch.Generator().manual_seed(seed))  # (1, K)
    return prompt, codes


def their_code_scores(hf, prompt, codes):
    embeds = torch.cat([hf.get_input_embeddings()(prompt), hf.prepare_embeddings_for_image_generation(codes)], 1)
    with torch.no_grad():
        hidden = hf.model.language_model(inputs_embeds=embeds).last_hidden_state  # (1, T, D)
        return hf.model.generation_head(hidden[:, prompt.shape[1] - 1: -1])  # (1, K, codes)


def our_code_scores(model, prompt, codes):
    ids = torch.cat([prompt, codes + model.code_offset], 1)  # (1, T)
    with torch.no_grad():
        return model(ids).code_logits[:, prompt.shape[1] - 1: -1]  # (1, K, codes)


def our_logits(model, inputs):
    images = ImageBatch.of(inputs["pixel_values"], model.encoder.grid)
    with torch.no_grad():
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=images).logits


def assert_same_numbers(hf, processor, model):
    inputs = reading_inputs(processor)
    with torch.no_grad():
        theirs = hf(**inputs).logits  # (B, T, V)
    real = inputs["attention_mask"].bool()
    assert (our_logits(model, inputs)[..., : theirs.shape[-1]] - theirs)[real].abs().max() == 0.0
    prompt, codes = drawing_inputs(processor, model)
    assert (our_code_scores(model, prompt, codes) - their_code_scores(hf, prompt, codes)).abs().max() == 0.0
    with torch.no_grad():
        ours = model.image_tokenizer.decode(codes.view(1, *model.image_tokenizer.grid))  # (1, 3, H, W)
        assert (ours.permute(0, 2, 3, 1) - hf.decode_image_tokens(codes)).abs().max() == 0.0


def test_our_pixels_are_the_processors(pair):
    hf, processor, model, tokenizer, config, *_ = pair
    assert_pixels_are_the_processors(processor, model, config, pictures())


def test_imported_numbers_match_transformers(pair):
    hf, processor, model, *_ = pair
    assert_same_numbers(hf, processor, model)


def test_the_pictures_change_the_logits_and_the_codes_the_scores(pair):
    """The comparisons above could pass on inputs that are ignored: they are not."""
    hf, processor, model, *_ = pair
    inputs = reading_inputs(processor)
    blank = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
    assert (our_logits(model, inputs) - our_logits(model, blank)).abs().max() > 1e-4
    prompt, codes = drawing_inputs(processor, model)
    _, other = drawing_inputs(processor, model, seed=1)
    assert (our_code_scores(model, prompt, codes) - our_code_scores(model, prompt, other))[:, 1:].abs().max() > 1e-4


def test_export_round_trip_matches(pair, tmp_path):
    hf, processor, model, tokenizer, config, src, ours_dir = pair
    out = export_checkpoint(ours_dir, tmp_path / "janus", "janus", log=quiet)
    back = JanusForConditionalGeneration.from_pretrained(out).eval()
    back_processor = JanusProcessor.from_pretrained(out, backend="pil")
    reference = reading_inputs(processor)
    again = reading_inputs(back_processor)
    assert torch.equal(again["input_ids"], reference["input_ids"])
    assert torch.equal(again["pixel_values"], reference["pixel_values"])
    assert_same_numbers(back, back_processor, model)


def test_a_model_that_does_not_fit_janus_is_refused_with_every_reason(pair, tmp_path):
    *_, ours_dir = pair
    from fusionlm.checkpoint import load_model

    with pytest.raises(ExportError) as err:
        export_checkpoint(ours_dir, tmp_path / "llava", "llava", log=quiet)
    assert "the encoder is 'janus'" in str(err.value)
    assert not (tmp_path / "llava").exists()
    model, *_ = load_model(ours_dir)
    assert model.config.generation.kind == "decoupled"


@pytest.mark.parametrize("fmt, reasons", [
    ("janus", ["Janus reads with its own 'janus' tower", "Janus draws in a 'janus' VQ model", "Janus's is 'decoupled'"]),
    ("emu3", ["Emu3 reads pictures as codes: 'early'", "Emu3 draws in an 'emu3' VQ model", "Emu3's is 'shared'"]),
])
def test_a_reading_model_is_refused_by_the_drawing_formats(make_model, tokenizer, tiny_config, tmp_path, fmt, reasons):
    from fusionlm.checkpoint import save_model

    path = save_model(make_model("unified"), tokenizer, tiny_config("unified"), tmp_path / "ck")
    with pytest.raises(ExportError) as err:
        export_checkpoint(path, tmp_path / "out", fmt, log=quiet)
    assert all(r in str(err.value) for r in reasons), str(err.value)
    assert not (tmp_path / "out").exists()


def requests():
    from fusionlm.generate import Request

    imgs = pictures()
    return [Request(p, imgs[:n]) for p, n in PROMPTS]


def test_our_token_ids_are_the_processors(pair):
    """Each shown picture enclosed in <begin_of_image> ... <end_of_image>, as Janus's processor writes it."""
    from fusionlm.data.chat import encode

    hf, processor, model, tokenizer, config, *_ = pair
    spec = ImageSpec.for_model(model, config)
    for req in requests():
        inputs = [[spec.process(i)] for i in req.images]
        ours = encode(req.sample(), tokenizer, [model.layout.image_tokens(i) for i in inputs], max_length=512,
                      image_token=config.model.tokenizer.image_token, add_generation_prompt=True).input_ids
        theirs = processor(text=[chat(processor, req.sample().messages[0]["content"])],
                           images=req.images or None)["input_ids"][0]
        assert ours == list(theirs)


def test_imported_greedy_generation_matches_transformers(pair):
    from fusionlm.generate import generate_ids

    hf, processor, model, tokenizer, config, *_ = pair
    spec = ImageSpec.for_model(model, config)
    ours = generate_ids(model, tokenizer, requests(), spec, max_new_tokens=8)
    inputs = reading_inputs(processor)
    out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=model.ids.end,
                      pad_token_id=model.ids.pad, suppress_tokens=[model.ids.image, model.ids.begin_image,
                                                                   model.ids.end_image])
    theirs = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        theirs.append(row[: row.index(model.ids.end)] if model.ids.end in row else row)
    assert ours == theirs
    assert any(len(row) > 0 for row in ours)


def test_any_recipe_can_enclose_shown_pictures_and_half_a_pair_is_refused(tokenizer, tiny_config):
    from fusionlm.checkpoint import added_tokens, build_model
    from fusionlm.data.tokenizer import add_tokens
    from fusionlm.errors import ConfigError

    config = tiny_config("unified")
    config.model.tokenizer.image_begin, config.model.tokenizer.image_end = "<boi>", "<eoi>"
    tok = add_tokens(copy.deepcopy(tokenizer), added_tokens(config.model))  # the shared fixture stays as it is
    model = build_model(config, tok)
    layout = model.layout.image_tokens([ImageSpec.for_model(model, config).process(pictures()[0])])
    assert layout[0] == tok.convert_tokens_to_ids("<boi>") and layout[-1] == tok.convert_tokens_to_ids("<eoi>")
    assert layout[1:-1] == [model.ids.image] * model.encoder.num_tokens
    config.model.tokenizer.image_end = None
    with pytest.raises(ConfigError, match="model.tokenizer.image_begin / image_end: set both or neither"):
        build_model(config, tok)


@pytest.mark.parametrize("cfg", [5.0, 2.0])
def test_exported_janus_draws_the_codes_fusionlm_draws(pair, tmp_path, cfg):
    """Greedy codes under guidance, a left-padded batch, through the export's own
    ``generate(generation_mode="image")``: the same null rows (padded), the same scores."""
    from fusionlm.draw import DrawRequest, Sampling, draw_codes

    hf, processor, model, tokenizer, config, src, ours_dir = pair
    out = export_checkpoint(ours_dir, tmp_path / "janus", "janus", log=quiet)
    back = JanusForConditionalGeneration.from_pretrained(out).eval()
    back_processor = JanusProcessor.from_pretrained(out, backend="pil")
    prompts = [DRAW, "Two red squares."]
    inputs = back_processor(text=[chat(back_processor, p) for p in prompts], generation_mode="image", padding=True,
                            return_tensors="pt")
    theirs = back.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=cfg)  # (B, K)
    ours = draw_codes(model, tokenizer, [DrawRequest(p) for p in prompts], sampling=Sampling(cfg=cfg, temperature=0))
    assert torch.equal(ours.flatten(1), theirs)
    assert len(set(theirs.flatten().tolist())) > 1


def test_cli_imports_a_janus_that_draws_from_the_command_line(tmp_path, capsys):
    from PIL import Image

    from fusionlm.cli import main

    src = janus_checkpoint(tmp_path / "src")
    assert main(["import", str(src), str(tmp_path / "ours")]) == 0
    out = tmp_path / "pictures" / "blue.png"
    assert main(["generate", "--checkpoint", str(tmp_path / "ours"), "--prompt", "two blue squares", "--image-out",
                 str(out), "--n", "2", "--cfg", "5", "--temperature", "0"]) in (0, None)
    written = [tmp_path / "pictures" / f"blue-{k}.png" for k in range(2)]
    assert [str(p) for p in written] == capsys.readouterr().out.split()[-2:]
    pictures = [Image.open(p) for p in written]
    assert all(p.size == (16, 16) for p in pictures)  # the VQ model's 4 x 4 codes of 4 pixels
    assert pictures[0].tobytes() == pictures[1].tobytes()  # greedy: the seed does not matter
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--format", "janus"]) == 0
    assert (tmp_path / "back" / "processor_config.json").is_file()
