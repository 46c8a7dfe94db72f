"""Emu3 import/export: fusionlm's numbers equal transformers' Emu3ForConditionalGeneration.

On a tiny random checkpoint written here (fp32): the ids of prompts with and without pictures (a
picture written as Emu3's processor and model write it: its grid as text, its codes row by row,
each row ended), the logits over them (a left-padded batch), the scores of every code of a drawn
picture, the pixels ``decode_image_tokens`` gives, greedy drawing against transformers' own
``generate`` (with and without guidance), and all of it again after ``fusionlm export``.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Emu3ForConditionalGeneration, Emu3Processor

from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.data.prompt import PromptEncoder
from fusionlm.errors import ConfigError
from fusionlm.generate import Request
from fusionlm.interop import export_checkpoint, import_checkpoint
from hf_tiny import emu3_checkpoint, import_pair, noise_images

PROMPTS = [("<image>\nWhat color is the square?", 1), ("Describe the image in one sentence.", 0),
           ("Compare <image> with <image>.", 2)]
DRAW = "A small blue circle next to a green triangle."


def quiet(*_):
    pass


def pictures():
    return noise_images([(32, 32), (32, 32)])  # the size the processor reads and fusionlm's tokenizer draws


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, its processor, our model, tokenizer, config, source dir, our dir)."""
    tmp = tmp_path_factory.mktemp("emu3")
    return import_pair(tmp, emu3_checkpoint(tmp / "src"), Emu3ForConditionalGeneration, Emu3Processor)


def requests():
    imgs = pictures()
    return [Request(p, imgs[:n]) for p, n in PROMPTS]


def chat(processor, prompt: str) -> str:
    return processor.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)


def their_ids(hf, processor, prompt: str, images) -> list[int]:
    """The processor's ids with the image placeholders holding what Emu3's model puts there: the
    codes' BPE ids, each row ended."""
    inputs = processor(text=[chat(processor, prompt)], images=images or None, return_tensors="pt")
    ids = inputs["input_ids"].clone()
    if images:
        with torch.no_grad():
            ids[ids == hf.config.image_token_id] = hf.model.get_image_tokens(inputs["pixel_values"],
                                                                              inputs["image_sizes"]).long()
    return ids[0].tolist()


def our_ids(model, tokenizer, config, request) -> list[int]:
    prompted = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config)).request(request)
    return model.coded(prompted.encoded.input_ids, prompted.drawn)


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def assert_same_logits(hf, model, ids, mask):
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        out = model(ids, attention_mask=mask)
    real, k, off = mask.bool(), model.image_tokenizer.codebook_size, model.code_offset
    text = out.logits[..., : theirs.shape[-1]]  # (B, T, V): the code columns -inf
    finite = text.isfinite()
    assert finite[..., off: off + k].sum() == 0 and finite[..., :off].all()
    assert (text[..., :off] - theirs[..., :off])[real].abs().max() == 0.0
    assert (out.code_logits - theirs[..., off: off + k])[real].abs().max() == 0.0


def drawing_ids(model, tokenizer, config, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """A drawing prompt, its picture's opening, and a picture's worth of random codes (h, w), written
    with the row ends, footer and end."""
    from fusionlm.data.drawing import DrawLayout

    layout = DrawLayout.of(model)
    prompt = PromptEncoder.of(model, tokenizer, None).request(Request(DRAW)).encoded.input_ids
    codes = torch.randint(0, model.image_tokenizer.codebook_size, model.image_tokenizer.grid,
                          generator=torch.Generator().manual_seed(seed))  # (h, w)
    picture = layout.tokens()
    slots = [i for i, t in enumerate(picture) if t == layout.code]
    for slot, code in zip(slots, codes.flatten().tolist()):
        picture[slot] = code + model.code_offset
    return prompt + picture, codes


def assert_same_numbers(hf, processor, model, tokenizer, config):
    rows = [their_ids(hf, processor, r.prompt, r.images) for r in requests()]
    assert_same_logits(hf, model, *left_padded(rows, tokenizer.pad_token_id))
    ids, codes = drawing_ids(model, tokenizer, config)
    assert_same_logits(hf, model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    rows_of = codes + model.code_offset  # (h, w) the codes' BPE ids
    eol = torch.full((codes.shape[0], 1), model.ids.row_end)
    tail = torch.tensor([[model.ids.frame_end, model.ids.end_image, model.ids.end]])
    sequence = torch.cat([torch.cat([rows_of, eol], 1).flatten()[None], tail], 1)  # what Emu3 generates
    with torch.no_grad():
        theirs = hf.decode_image_tokens(image_tokens=sequence, height=codes.shape[0], width=codes.shape[1])
        ours = model.image_tokenizer.decode(codes[None])  # (1, 3, H, W)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() == 0.0


def test_a_picture_is_written_as_emu3_writes_it(pair):
    hf, processor, model, tokenizer, config, *_ = pair
    for request in requests():
        assert our_ids(model, tokenizer, config, request) == their_ids(hf, processor, request.prompt, request.images)
    ours = our_ids(model, tokenizer, config, requests()[0])
    assert ours.count(model.ids.row_end) == model.image_tokenizer.grid[0]  # 4 rows of 4 codes at 32 px
    opening = processor(text=["x"], return_for_image_generation=True, image_area=32 * 32)["input_ids"][0]
    from fusionlm.data.drawing import DrawLayout

    assert opening[-len(DrawLayout.of(model).opening):] == DrawLayout.of(model).opening  # "<|image start|>4*4<|image token|>"


def test_imported_numbers_match_transformers(pair):
    assert_same_numbers(*pair[:5])


def test_the_pictures_change_the_logits(pair):
    """The comparisons above could pass on inputs that are ignored: they are not."""
    hf, processor, model, tokenizer, config, *_ = pair
    request = requests()[0]
    blank = Request(request.prompt, noise_images([(32, 32)], seed=5))
    a, b = our_ids(model, tokenizer, config, request), our_ids(model, tokenizer, config, blank)
    assert a != b and len(a) == len(b)
    with torch.no_grad():
        off = model.code_offset
        assert (model(torch.tensor([a])).logits[0, -1, :off] - model(torch.tensor([b])).logits[0, -1, :off]).abs().max() > 1e-4


def test_export_round_trip_matches(pair, tmp_path):
    hf, processor, model, tokenizer, config, src, ours_dir = pair
    out = export_checkpoint(ours_dir, tmp_path / "emu3", "emu3", log=quiet)
    back = Emu3ForConditionalGeneration.from_pretrained(out).eval()
    back_processor = Emu3Processor.from_pretrained(out, backend="pil")
    for r in requests():
        assert their_ids(back, back_processor, r.prompt, r.images) == their_ids(hf, processor, r.prompt, r.images)
    assert_same_numbers(back, back_processor, model, tokenizer, config)


def draw_with_transformers(hf, model, rows: list[list[int]], cfg: float) -> torch.Tensor:
    """Greedy codes from transformers' ``generate``, told where Emu3's grammar puts codes and row
    ends; guided against ``rows[1]`` (the null prompt) when ``cfg`` is not 1."""
    rows_, cols = model.image_tokenizer.grid
    k, off, eol = model.image_tokenizer.codebook_size, model.code_offset, model.ids.row_end
    start = len(rows[0])

    def allowed(_, ids):
        at = len(ids) - start
        return [eol] if (at + 1) % (cols + 1) == 0 else list(range(off, off + k))

    guided = {} if cfg == 1.0 else {"guidance_scale": cfg, "negative_prompt_ids": torch.tensor([rows[1]])}
    out = hf.generate(torch.tensor([rows[0]]), attention_mask=torch.ones(1, start, dtype=torch.long),
                      max_new_tokens=rows_ * (cols + 1) - 1, do_sample=False, prefix_allowed_tokens_fn=allowed,
                      pad_token_id=model.ids.pad, **guided)[0, start:]
    codes = out[(torch.arange(len(out)) + 1) % (cols + 1) != 0]
    return codes.view(rows_, cols) - off


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_drawing_matches_transformers_generate(pair, cfg):
    from fusionlm.draw import DrawRequest, Sampling, _rows, draw_codes

    hf, processor, model, tokenizer, config, *_ = pair
    request = DrawRequest(DRAW)
    ours = draw_codes(model, tokenizer, [request], sampling=Sampling(cfg=cfg, temperature=0))[0]  # (h, w)
    rows, _ = _rows(model, tokenizer, None, [request], guided=True)  # the prompt, then its null prompt
    assert torch.equal(ours, draw_with_transformers(hf, model, rows, cfg))
    assert len(set(ours.flatten().tolist())) > 1


def test_cli_imports_an_emu3_that_draws_and_exports_it(tmp_path, capsys):
    from PIL import Image

    from fusionlm.cli import main

    src = emu3_checkpoint(tmp_path / "src")
    assert main(["import", str(src), "--out", str(tmp_path / "ours")]) == 0
    out = tmp_path / "red.png"
    assert main(["generate", "--checkpoint", str(tmp_path / "ours"), "--prompt", "two red squares", "--image-out",
                 str(out), "--cfg", "3", "--seed", "1"]) in (0, None)
    assert Image.open(out).size == (32, 32)  # 4 x 4 codes of 8 pixels
    assert main(["export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back"),
                 "--format", "emu3"]) == 0
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert saved["vocabulary_map"]["<|visual token 000000|>"] == json.loads(
        (src / "config.json").read_text())["vocabulary_map"]["<|visual token 000000|>"]


def test_an_emu3_fusionlm_cannot_hold_is_refused_with_every_reason(tmp_path):
    src = emu3_checkpoint(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    vocab = config["vocabulary_map"]
    vocab["<|visual token 000000|>"], vocab["<|visual token 000001|>"] = (vocab["<|visual token 000001|>"],
                                                                        vocab["<|visual token 000000|>"])
    (src / "config.json").write_text(json.dumps(config))
    settings = json.loads((src / "processor_config.json").read_text())
    settings["image_processor"]["image_mean"] = [0.48, 0.46, 0.41]
    (src / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError) as err:
        import_checkpoint(str(src), tmp_path / "ours", log=quiet)
    assert "not at consecutive ids" in str(err.value) and "mean [0.48, 0.46, 0.41]" in str(err.value)
    assert not (tmp_path / "ours").exists()
