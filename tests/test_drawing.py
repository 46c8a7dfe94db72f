"""Models that draw: the image tokenizer as a part and a stage, the shared-vocabulary (Chameleon,
Emu3) and decoupled (Janus) generation designs, condition dropout, guided sampling, and GenEval in
``fusionlm eval``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusionlm.checkpoint import build_model, load_model
from fusionlm.cli import main
from fusionlm.config import from_dict, load_recipe, to_dict, validate
from fusionlm.data.batching.batches import ImageSpec, MixtureBatches
from fusionlm.data.chat import IGNORE
from fusionlm.data.drawing import drawn_items, null_prompt
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.sources import build_source
from fusionlm.data.world import World
from fusionlm.data.world.scenes import CATEGORIES
from fusionlm.converse import AnswerRequest, answer
from fusionlm.draw import DrawRequest, Sampling, _rows, draw, draw_codes
from fusionlm.generate import Request, generate
from fusionlm.errors import ConfigError
from fusionlm.recipe import make_tokenizer
from fusionlm.train.loop import train
from helpers_train import TINY_OVERRIDES, read_metrics, stage, tiny_dict, weights, checkpoints

TOKENIZER = {"kind": "vq", "image_size": 16, "downsample": 4, "codebook_size": 32, "code_dim": 8, "channels": 8}


def drawing_dict(kind: str = "shared", **stages) -> dict:
    data = tiny_dict()
    data["model"]["image_tokenizer"] = dict(TOKENIZER)
    data["model"]["generation"] = {"kind": kind}
    data["stages"] = [stage("tokenizer", objective="reconstruction", train=["image_tokenizer"], mixture={"draw": 1},
                            steps=3, batch_size=4),
                      stage("t2i", train=["llm", "connector", "generation"] if kind == "decoupled" else ["llm", "connector"],
                            mixture={"draw": 2, "color": 1}, steps=3, batch_size=4, condition_dropout=0.25)]
    return data


def built(data: dict):
    config = validate(from_dict(data))
    tokenizer = make_tokenizer(config, build_source(config.data))
    torch.manual_seed(0)
    return build_model(config, tokenizer), tokenizer, config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A shared-vocabulary model trained 3 + 3 steps (tokenizer, then text to image), on disk."""
    out = tmp_path_factory.mktemp("drawing") / "run"
    train(validate(from_dict(drawing_dict())), out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(run)


# ----------------------------------------------------------------------------- config


def test_a_drawing_model_needs_an_image_tokenizer_and_unpacked_rows():
    data = drawing_dict()
    del data["model"]["image_tokenizer"]
    with pytest.raises(ConfigError, match="model.image_tokenizer"):
        validate(from_dict(data))
    data = drawing_dict()
    data["model"]["generation"]["kind"] = "autoregressive"
    with pytest.raises(ConfigError, match="model.generation.kind.*decoupled.*diffusion.*masked.*next_scale.*none.*shared"):
        validate(from_dict(data))
    data = drawing_dict()
    data["data"]["pack"] = True
    with pytest.raises(ConfigError, match="data.pack"):
        validate(from_dict(data))
    data = drawing_dict()
    data["stages"][1]["condition_dropout"] = 1.0
    with pytest.raises(ConfigError, match="stages.1.condition_dropout"):
        validate(from_dict(data))
    data = drawing_dict()
    data["stages"][1]["loss_weights"] = {"codes": 2.0}
    with pytest.raises(ConfigError, match="stages.1.loss_weights.*'codes'"):
        validate(from_dict(data))


# ----------------------------------------------------------------------------- data


def test_a_picture_in_an_assistant_turn_is_drawn_as_codes_and_learned():
    model, tokenizer, config = built(drawing_dict())
    sample = World(32, 0).sample("draw", "train", 0)
    assert drawn_items(sample) == [True]
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    prompted = prompts.sample(sample)
    ids, labels = prompted.encoded.input_ids, prompted.encoded.labels
    begin = ids.index(model.ids.begin_image)
    n = model.image_tokenizer.grid[0] * model.image_tokenizer.grid[1]
    assert n == 16 and ids[begin + 1: begin + 1 + n] == [model.ids.code] * n and ids[begin + 1 + n] == model.ids.end_image
    assert labels[begin: begin + n + 2] == ids[begin: begin + n + 2]  # begin, every code and end are targets
    assert not prompted.inputs and len(prompted.drawn) == 1 and prompted.drawn[0].shape == (3, 16, 16)
    # a model that only reads takes the same picture as an input, never as a target
    reader, rtok, rconfig = built(tiny_dict())
    read = PromptEncoder.of(reader, rtok, ImageSpec.for_model(reader, rconfig)).sample(sample)
    assert len(read.inputs) == 1 and not read.drawn
    assert all(label == IGNORE for i, label in zip(read.encoded.input_ids, read.encoded.labels) if i == reader.ids.image)


def test_condition_dropout_trains_on_the_null_prompt_that_guidance_samples_against():
    model, tokenizer, config = built(drawing_dict())
    spec = ImageSpec.for_model(model, config)
    prompts = PromptEncoder.of(model, tokenizer, spec)
    source = build_source(config.data)

    def dataset(p):
        return MixtureBatches(source, {"draw": 1}, seed=0, stage=1, batch_size=8, prompts=prompts, condition_dropout=p)

    users = [[s.messages[0]["content"] for s in (dataset(p).sample_at(n) for n in range(40))] for p in (0.0, 0.5, 0.5)]
    assert all(users[0]) and users[1] == users[2]  # per sample number: a resumed run drops the same ones
    dropped = [n for n, u in enumerate(users[1]) if not u]
    assert 8 < len(dropped) < 32 and all(users[1][n] == users[0][n] for n in range(40) if n not in dropped)
    # the null row a guided request samples from is the training encoding of the null prompt, up to its picture
    sample = World(32, 0).sample("draw", "train", 5)
    trained = prompts.sample(null_prompt(sample)).encoded.input_ids
    rows, _ = _rows(model, tokenizer, spec, [DrawRequest(sample.messages[0]["content"])], guided=True)
    assert rows[1] == trained[: trained.index(model.ids.begin_image) + 1]
    assert rows[0] == prompts.sample(sample).encoded.input_ids[: len(rows[0])]


def test_a_padded_null_prompt_is_the_same_in_training_and_guidance():
    """Janus's null prompt (``model.generation.null_prompt: padded``): the prompt's tokens before the
    picture padded, BOS and <begin_of_image> kept, as long as the conditional prompt."""
    data = drawing_dict("decoupled")
    data["model"]["generation"]["null_prompt"] = "padded"
    model, tokenizer, config = built(data)
    spec = ImageSpec.for_model(model, config)
    prompts = PromptEncoder.of(model, tokenizer, spec)
    sample = World(32, 0).sample("draw", "train", 5)
    given, null = prompts.sample(sample).encoded, prompts.sample(null_prompt(sample, "padded")).encoded
    begin = given.input_ids.index(model.ids.begin_image)
    keep = {model.ids.begin_image, model.ids.bos}
    assert len(null.input_ids) == len(given.input_ids) and null.labels == given.labels
    assert null.input_ids[begin:] == given.input_ids[begin:]  # the picture and what follows it stay
    assert null.input_ids[:begin] == [t if t in keep else model.ids.pad for t in given.input_ids[:begin]]
    assert set(null.input_ids[:begin]) <= keep | {model.ids.pad} and null.input_ids != given.input_ids
    rows, _ = _rows(model, tokenizer, spec, [DrawRequest(sample.messages[0]["content"])], guided=True)
    assert rows[1] == null.input_ids[: begin + 1] and len(rows[1]) == len(rows[0])
    dataset = MixtureBatches(build_source(config.data), {"draw": 1}, seed=0, stage=1, batch_size=8, prompts=prompts,
                             condition_dropout=0.5)
    dropped = [s for s in (dataset.sample_at(n) for n in range(16)) if s.null]
    assert dropped and all(s.messages[0]["content"] for s in dropped)  # text kept: the encoder pads it
    with pytest.raises(ConfigError, match="model.generation.null_prompt: 'blank' is not one of text_removed, padded"):
        data["model"]["generation"]["null_prompt"] = "blank"
        validate(from_dict(data))


# ----------------------------------------------------------------------------- the designs


def test_shared_vocabulary_masks_code_and_text_logits_apart():
    model, tokenizer, config = built(drawing_dict("shared"))
    offset, k = model.code_offset, model.image_tokenizer.codebook_size
    assert offset == len(tokenizer) and model.llm.get_input_embeddings().weight.shape[0] == offset + k
    batch = _prompted_batch(model, tokenizer, config)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, labels=batch.labels,
                drawn=batch.drawn)
    assert torch.isinf(out.logits[..., offset:]).all() and torch.isfinite(out.logits[..., :offset]).all()
    ids = model.with_codes(batch.input_ids, batch.drawn)
    raw = model.llm(inputs_embeds=model.embed(ids, model.encode_images(batch.pixels, ids))[0],
                    attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(out.code_logits, raw[..., offset:])
    targets = torch.where(batch.labels == model.ids.code, ids, batch.labels)[:, 1:]
    is_code = targets >= offset
    text = F.cross_entropy(raw[:, :-1][~is_code][:, :offset], targets[~is_code], ignore_index=IGNORE, reduction="sum")
    codes = F.cross_entropy(raw[:, :-1][is_code][:, offset:], targets[is_code] - offset, reduction="sum")
    n = int((targets != IGNORE).sum())
    torch.testing.assert_close(out.loss, (text + codes) / n)
    unmasked = F.cross_entropy(raw[:, :-1].reshape(-1, offset + k), targets.reshape(-1), ignore_index=IGNORE)
    assert abs(float(unmasked.detach()) - float(out.loss.detach())) > 1e-3  # masked apart, not merely ignored
    weighted = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                     labels=batch.labels, drawn=batch.drawn, loss_weights=(1.0, 0.0))
    torch.testing.assert_close(weighted.loss, text / n)


def _prompted_batch(model, tokenizer, config, n: int = 3):
    from fusionlm.data.batching.batches import collate

    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    world = World(32, 0)
    done = [prompts.sample(s) for s in [world.sample("draw", "train", i) for i in range(n)] + [world.sample("color", "train", 0)]]
    return collate(done, ["x"] * len(done), [], tokenizer.pad_token_id)


def early_dict(kind: str = "shared") -> dict:
    """Chameleon's early fusion: no encoder, no connector; pictures read as codes."""
    data = drawing_dict(kind)
    data["model"]["fusion"] = {"kind": "early"}
    data["model"]["encoder"]["kind"] = data["model"]["connector"]["kind"] = "none"
    data["stages"][1]["train"] = ["llm", "generation"] if kind == "decoupled" else ["llm"]
    return data


@pytest.mark.parametrize("kind", ["shared", "decoupled"])
def test_the_early_fusion_reads_pictures_as_codes(kind, tmp_path):
    model, tokenizer, config = built(early_dict(kind))
    assert sum(p.numel() for p in [*model.encoder.parameters(), *model.connector.parameters()]) == 0
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    read = prompts.sample(World(32, 0).sample("color", "train", 0))
    ids, labels = read.encoded.input_ids, read.encoded.labels
    begin, n = ids.index(model.ids.begin_image), 16
    assert ids[begin: begin + n + 2] == [model.ids.begin_image] + [model.ids.code] * n + [model.ids.end_image]
    assert all(label == IGNORE for label in labels[begin: begin + n + 2])  # read, not learned
    assert not read.inputs and len(read.drawn) == 1 and model.ids.image not in ids
    # a batch of drawn and shown pictures trains (the codes of both come from the tokenizer)
    batch = _prompted_batch(model, tokenizer, config)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, drawn=batch.drawn)
    assert torch.isfinite(out.loss) and int(out.loss_parts["image_targets"]) == 3 * n  # the drawn pictures only
    # an answer about a picture reads its codes; another picture, other logits; both decoding paths agree
    world = World(32, 0)
    pictures = [world.sample("color", "test", i).images[0] for i in range(2)]
    spec = ImageSpec.for_model(model, config)
    asked = [Request("<image>\nWhat color is the shape?", [p]) for p in pictures]
    from fusionlm.generate import encode_requests, generate_ids

    coded, mask, pixels = encode_requests(model, tokenizer, asked, spec, 256)
    assert pixels is None and bool(((coded >= model.code_offset) & (coded < model.code_offset + 32)).any())
    with torch.no_grad():
        logits = model(coded, attention_mask=mask).logits[:, -1, : model.code_offset]  # (2, text vocabulary)
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    assert generate_ids(model, tokenizer, asked, spec, max_new_tokens=4) == \
        generate_ids(model, tokenizer, asked, spec, max_new_tokens=4, static=False)
    # and a model that reads through a tower cannot pass itself off as early
    data = early_dict(kind)
    data["model"]["encoder"]["kind"] = "siglip"
    with pytest.raises(ConfigError, match="model.encoder.kind: the early fusion reads pictures as codes"):
        validate(from_dict(data))
    data = early_dict(kind)
    data["model"]["generation"] = {"kind": "none"}
    data["stages"] = data["stages"][1:]
    with pytest.raises(ConfigError, match="model.generation.kind: the early fusion reads pictures as the codes"):
        validate(from_dict(data))


def test_an_early_fusion_recipe_trains_draws_and_reports_its_picture_positions(tmp_path, capsys):
    from helpers_train import write_recipe

    recipe = write_recipe(tmp_path / "early.yaml", early_dict("shared"))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) in (0, None)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    capsys.readouterr()
    assert main(["info", str(recipe)]) in (0, None)
    assert "0 from the encoder, 18 positions in the decoder sequence" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "<image>\nWhat color is it?",
                 "--image", str(_world_png(tmp_path))]) in (0, None)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--tasks", "color", "draw", "--per-task", "3",
                 "--out", str(tmp_path / "scores.json")]) in (0, None)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert "color" in json.dumps(scores) and "geneval" in json.dumps(scores)


def _world_png(tmp_path):
    path = tmp_path / "shape.png"
    World(32, 0).sample("color", "test", 0).images[0].save(path)
    return path


def test_decoupled_generation_keeps_the_text_vocabulary_and_trains_its_own_head():
    model, tokenizer, config = built(drawing_dict("decoupled"))
    assert model.code_offset == len(tokenizer) == model.llm.get_input_embeddings().weight.shape[0]
    parts = {model.part_of(n) for n, _ in model.named_parameters() if n.startswith("gen_")}
    assert parts == {"generation"}
    batch = _prompted_batch(model, tokenizer, config)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, labels=batch.labels,
                drawn=batch.drawn)
    assert out.code_logits.shape[-1] == model.image_tokenizer.codebook_size and out.logits.shape[-1] == len(tokenizer)
    out.loss.backward()
    assert model.gen_head.net[-1].weight.grad.abs().sum() > 0 and model.gen_embed.weight.grad.abs().sum() > 0
    assert model.image_tokenizer.encoder[0].weight.grad is None  # codes are targets: nothing flows into the tokenizer


@pytest.mark.parametrize("kind", ["shared", "decoupled"])
def test_a_drawing_checkpoint_rebuilds_with_its_codes(tmp_path, kind):
    data = drawing_dict(kind)
    for s in data["stages"]:
        s["steps"] = 1
    train(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None)
    model, tokenizer, config = load_model(tmp_path / "run")
    assert config.model.generation.code_offset == model.code_offset == len(tokenizer)
    a = draw_codes(model, tokenizer, [DrawRequest("a red circle", seed=3)], sampling=Sampling(cfg=2.0))
    again, _, _ = load_model(tmp_path / "run")
    assert torch.equal(a, draw_codes(again, tokenizer, [DrawRequest("a red circle", seed=3)], sampling=Sampling(cfg=2.0)))


# ----------------------------------------------------------------------------- sampling


def test_a_picture_does_not_depend_on_the_batch_it_is_drawn_in(loaded):
    model, tokenizer, _ = loaded
    requests = [DrawRequest("a red circle", seed=1), DrawRequest("two blue squares above a triangle", seed=2),
                DrawRequest("a green square", seed=3)]
    guided = Sampling(cfg=3.0, top_k=20)
    together = draw_codes(model, tokenizer, requests, sampling=guided)
    alone = torch.cat([draw_codes(model, tokenizer, [r], sampling=guided) for r in requests])
    assert torch.equal(together, alone)
    assert torch.equal(together, draw_codes(model, tokenizer, requests, sampling=guided, static=False))
    assert not torch.equal(together, draw_codes(model, tokenizer, requests, sampling=Sampling(cfg=1.0, top_k=20)))
    reseeded = [DrawRequest(r.prompt, seed=r.seed + 10) for r in requests]
    assert not torch.equal(together, draw_codes(model, tokenizer, reseeded, sampling=guided))
    greedy = draw_codes(model, tokenizer, requests, sampling=Sampling(cfg=3.0, temperature=0.0))
    assert torch.equal(greedy, draw_codes(model, tokenizer, requests, sampling=Sampling(cfg=3.0, top_k=1)))
    pictures = draw(model, tokenizer, requests[:1])
    assert isinstance(pictures[0], Image.Image) and pictures[0].size == (16, 16)


class Opening:
    """A hook on the LM head that makes rows ``rows`` of a batch open a picture when they may."""

    def __init__(self, model, rows):
        self.rows, self.begin = list(rows), model.ids.begin_image
        self.handle = model.llm.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, args, out):
        out = out.clone()
        out[self.rows, ..., self.begin] += 1e4
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_an_answer_can_hold_text_and_a_picture(loaded):
    model, tokenizer, _ = loaded
    sampling = Sampling(cfg=3.0, top_k=20)
    asked = [AnswerRequest("draw a red circle", seed=4), AnswerRequest("what is two plus two?", seed=5)]
    with Opening(model, [0, 2]):  # the first request's row and its null row open a picture at once
        together = answer(model, tokenizer, asked, sampling=sampling, max_new_tokens=6)
        general = answer(model, tokenizer, asked, sampling=sampling, max_new_tokens=6, static=False)
    with Opening(model, [0, 1]):  # alone: its row and its null row
        first = answer(model, tokenizer, asked[:1], sampling=sampling, max_new_tokens=6)
    with Opening(model, []):
        second = answer(model, tokenizer, asked[1:], sampling=sampling, max_new_tokens=6)
    drawn = together[0]
    assert len(drawn.pictures) == 1 and isinstance(drawn.parts[0], Image.Image) and drawn.text.startswith("<image>")
    assert drawn.pictures[0].size == (16, 16)
    # the picture opened first is the one draw() draws for the same prompt and seed
    (reference,) = draw(model, tokenizer, [DrawRequest("draw a red circle", seed=4)], sampling=sampling)
    assert drawn.pictures[0].tobytes() == reference.tobytes()
    # rows in different modes do not disturb each other, on either decoding path
    assert drawn.pictures[0].tobytes() == first[0].pictures[0].tobytes() == general[0].pictures[0].tobytes()
    assert together[1].parts == second[0].parts == general[1].parts and not together[1].pictures
    assert drawn.text == first[0].text == general[0].text
    # a text answer is the text generate() writes
    (text,) = generate(model, tokenizer, [Request("what is two plus two?")], ImageSpec.for_model(model, loaded[2]),
                       max_new_tokens=6)
    assert second[0].text == text


def test_answer_refuses_a_negative_picture_count_or_no_text_budget(loaded):
    model, tokenizer, _ = loaded
    for bad in ({"max_pictures": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ConfigError, match="answer: max_pictures must be >= 0 and max_new_tokens >= 1"):
            answer(model, tokenizer, [AnswerRequest("a red circle")], **bad)


def test_a_decoupled_answer_draws_its_picture_with_the_generation_head():
    model, tokenizer, _ = built(drawing_dict("decoupled"))
    sampling = Sampling(cfg=2.0)
    with Opening(model, [0, 1]):
        (said,) = answer(model, tokenizer, [AnswerRequest("a blue square", seed=7)], sampling=sampling,
                         max_new_tokens=3)
    (reference,) = draw(model, tokenizer, [DrawRequest("a blue square", seed=7)], sampling=sampling)
    assert len(said.pictures) == 1 and said.pictures[0].tobytes() == reference.tobytes()
    with Opening(model, [0]):  # no picture allowed (so no null row): the answer stays text
        (plain,) = answer(model, tokenizer, [AnswerRequest("a blue square", seed=7)], sampling=sampling,
                          max_new_tokens=3, max_pictures=0)
    assert not plain.pictures


def test_a_model_that_only_reads_refuses_to_draw(tmp_path, capsys):
    reader, tokenizer, _ = built(tiny_dict())
    with pytest.raises(ConfigError, match="does not draw"):
        draw_codes(reader, tokenizer, [DrawRequest("a red circle")])


# ----------------------------------------------------------------------------- the tokenizer stage


def test_the_tokenizer_stage_logs_reconstruction_and_codebook_use(run):
    rows = read_metrics(run)
    tokenizer_rows, t2i_rows = rows[:3], rows[3:]
    for row in tokenizer_rows:
        assert row["stage_name"] == "tokenizer" and row["psnr"] > 0
        assert 1 <= row["perplexity"] <= 32 and 0 < row["used"] <= 1 and row["dead"] == round(32 * (1 - row["used"]))
    assert all("psnr" not in r for r in t2i_rows) and all(r["loss"] > 0 for r in t2i_rows)
    for r in t2i_rows:  # each kind of target on its own; the loss is their mean over all targets
        assert min(r["loss_text"], r["loss_image"]) <= r["loss"] <= max(r["loss_text"], r["loss_image"])


# ----------------------------------------------------------------------------- commands


def test_generate_draws_pictures_to_files(run, tmp_path, capsys):
    out = tmp_path / "pics" / "circle.png"
    rc = main(["generate", "--checkpoint", str(run), "--prompt", "a red circle", "--image-out", str(out), "--n", "2",
               "--cfg", "2", "--seed", "4"])
    printed = capsys.readouterr().out.split()
    assert rc == 0 and printed == [str(tmp_path / "pics" / "circle-0.png"), str(tmp_path / "pics" / "circle-1.png")]
    first, second = (Image.open(p) for p in printed)
    assert first.size == (16, 16) and first.format == "PNG"
    model, tokenizer, _ = load_model(run)
    (expected,) = draw(model, tokenizer, [DrawRequest("a red circle", seed=5)], sampling=Sampling(cfg=2.0))
    assert list(second.convert("RGB").getdata()) == list(expected.getdata())


def test_generate_answers_in_text_and_pictures(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "answer"
    model, tokenizer, config = load_model(run)
    monkeypatch.setattr("fusionlm.cli._load", lambda *_: (model, tokenizer, config, ImageSpec.for_model(model, config)))
    with Opening(model, [0, 1]):  # the answer opens a picture first (3 steps have not taught it to)
        rc = main(["generate", "--checkpoint", str(run), "--prompt", "a red circle", "--pictures-out", str(out),
                   "--cfg", "2", "--seed", "3", "--max-new-tokens", "4"])
        (said,) = answer(model, tokenizer, [AnswerRequest("a red circle", seed=3)], sampling=Sampling(cfg=2.0),
                         max_new_tokens=4)
    printed = capsys.readouterr().out
    assert rc in (0, None) and printed.split()[0] == str(out / "answer-0.png")
    assert Image.open(out / "answer-0.png").convert("RGB").tobytes() == said.pictures[0].tobytes()
    assert printed.strip() == said.text.replace("<image>", f" {out / 'answer-0.png'} ").strip()


def test_eval_scores_the_draw_task_by_geneval(run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    rc = main(["eval", "--checkpoint", str(run), "--tasks", "draw", "color", "--per-task", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["metrics"]["draw"] == "geneval" and data["metrics"]["color"] == "exact_match"
    categories = [f"draw/{c}" for c in CATEGORIES]
    assert all(data["n"][k] == 2 for k in categories) and data["n"]["draw"] == 12
    overall = sum(data["scores"][k] for k in categories) / 6
    assert data["scores"]["draw"] == pytest.approx(overall)
    assert 0 <= data["scores"]["draw/ceiling"] <= 1 and data["scores"]["draw/fd"] > 0  # 3 steps: far from the world
    assert all(set(e) >= {"question", "category", "failed"} for e in data["examples"]["draw"])


def test_info_reports_what_a_picture_costs():
    from fusionlm.info import report

    r = report(from_dict(drawing_dict("decoupled")))
    assert r.drawing["codes"] == 16 and r.drawing["positions"] == 18
    assert r.drawing["flops_guided"] > 1.5 * r.drawing["flops"] > 0
    assert r.params["image_tokenizer"] > 0 and r.params["generation"] > 0
    assert r.training["tokenizer"]["image_tokenizer"] > 0 and r.training["tokenizer"]["llm"] == 0
    assert r.training["t2i"]["generation"] == pytest.approx(3 * r.forward["generation"])
    assert "codes per picture" in r.markdown()


# ----------------------------------------------------------------------------- the shipped recipe

JANUS_STEPS = (4, 2, 2, 4, 2)  # pretrain_tokenizer, pretrain_encoder, adaptors, unified, finetune
CHAMELEON_STEPS = (3, 3, 2)  # pretrain_tokenizer, pretrain, finetune (early fusion: no tower stage)
SHOWO_STEPS = (3, 2, 3, 2)  # pretrain_tokenizer, pretrain_encoder, pretrain, finetune (masked codes)
VAR_STEPS = (3, 2, 3, 2)  # the same stages, next-scale prediction over a multi-scale tokenizer


TRANSFUSION_STEPS = (2, 3, 2)  # pretrain_encoder, pretrain, finetune (no tokenizer to train: raw patches)


def tiny_overrides(steps: tuple[int, ...], code_dim: int = 8) -> list[str]:
    return TINY_OVERRIDES + [
        "model.image_tokenizer.image_size=16", "model.image_tokenizer.codebook_size=32",
        f"model.image_tokenizer.code_dim={code_dim}", "model.image_tokenizer.channels=8", "train.checkpoint_every=2",
        "data.loader_workers=0",
    ] + [f"stages.{i}.steps={n}" for i, n in enumerate(steps)] + [f"stages.{i}.batch_size=4" for i in range(len(steps))]


TINY_JANUS = tiny_overrides(JANUS_STEPS)


def test_the_janus_recipe_runs_every_stage_objective():
    config = load_recipe("janus", TINY_JANUS)
    assert [s.objective for s in config.stages] == ["reconstruction", "contrastive", "lm", "lm", "lm"]
    assert config.model.generation.kind == "decoupled" and all(s.condition_dropout for s in config.stages[2:])


@pytest.mark.parametrize("recipe, steps", [("janus", JANUS_STEPS), ("chameleon", CHAMELEON_STEPS),
                                           ("showo", SHOWO_STEPS), ("var", VAR_STEPS),
                                           ("transfusion", TRANSFUSION_STEPS)])
def test_a_drawing_recipe_trains_alike_on_one_and_two_processes(tmp_path, recipe, steps):
    """janus (a tower, decoupled drawing), chameleon (early fusion: pictures read as codes, shared) and
    showo (masked codes: each sample's own mask, whichever process reads it) and var (a multi-scale
    codebook, k-means seeded on the finest maps of every process) and transfusion (each picture's
    noise and noise level from its sample's seed)."""
    from test_distributed import run_parallel

    config = load_recipe(recipe, tiny_overrides(steps, 48 if recipe == "transfusion" else 8))
    assert (config.model.fusion.kind == "early") == (recipe == "chameleon")
    train(config, tmp_path / "one", log=lambda *_: None)
    run_parallel(to_dict(config), tmp_path / "two")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["stage_name"] for r in one] == [r["stage_name"] for r in two] and len(one) == sum(steps)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (a["step"], a["loss"], b["loss"])
        if config.stages[a["stage"]].objective == "reconstruction":  # the same reconstruction, the same codebook use
            assert (b["psnr"], b["perplexity"]) == pytest.approx((a["psnr"], a["perplexity"]), rel=1e-4)
            assert (a["used"], a["dead"]) == (b["used"], b["dead"])
        else:
            assert "psnr" not in a and "psnr" not in b
        assert (a["tokens"], a["samples_trained"]) == (b["tokens"], b["samples_trained"])
    wa, wb = weights(checkpoints(tmp_path / "one")[-1]), weights(checkpoints(tmp_path / "two")[-1])
    book = "image_tokenizer.quantizer._codebook.embed"
    if recipe == "transfusion":  # no codebook: the diffusion head instead
        book = "gen_out.net.2.weight"
    torch.testing.assert_close(wb[book], wa[book], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe, steps, stops", [("janus", JANUS_STEPS, (3, 11)), ("chameleon", CHAMELEON_STEPS, (2, 5)),
                                                  ("showo", SHOWO_STEPS, (2, 7)), ("var", VAR_STEPS, (2, 7)),
                                                  ("transfusion", TRANSFUSION_STEPS, (1, 4))])
def test_a_drawing_recipe_resumes_as_if_never_stopped(tmp_path, monkeypatch, recipe, steps, stops):
    """Stopped inside the tokenizer stage (transfusion: its contrastive one), then inside a drawing
    stage (its condition dropout; transfusion: its pictures' noise)."""
    from helpers_train import interrupt_after

    config = load_recipe(recipe, tiny_overrides(steps, 48 if recipe == "transfusion" else 8))
    train(config, tmp_path / "a", log=lambda *_: None)
    for stop in stops:
        with monkeypatch.context() as m:
            interrupt_after(m, stop)
            with pytest.raises(KeyboardInterrupt):
                train(config, tmp_path / "b", resume=stop > stops[0], log=lambda *_: None)
    train(config, tmp_path / "b", resume=True, log=lambda *_: None)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, sum(steps) + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
        if config.stages[ra["stage"]].objective == "reconstruction":
            assert rb["psnr"] == pytest.approx(ra["psnr"], abs=1e-6) and rb["dead"] == ra["dead"]
    wa, wb = weights(checkpoints(tmp_path / "a")[-1]), weights(checkpoints(tmp_path / "b")[-1])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


def test_compare_reports_geneval_beside_the_understanding_scores(tmp_path, capsys):
    from helpers_train import write_recipe

    recipe = write_recipe(tmp_path / "painter.yaml", drawing_dict("decoupled"))
    assert main(["compare", str(recipe), "--steps", "6", "--out", str(tmp_path / "cmp"), "--per-task", "2",
                 "--shots", "0", "1"]) == 0
    (result,) = json.loads((tmp_path / "cmp" / "results.json").read_text())
    zero, one = result["scores"]["0-shot"], result["scores"]["1-shot"]
    assert {"color", "draw", "draw/ceiling", "draw/fd", *(f"draw/{c}" for c in CATEGORIES)} <= set(zero)
    assert "color" in one and "draw" not in one  # pictures are drawn from the prompt alone: once
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "draws: decoupled" in report and "## Drawing (GenEval on held-out prompts)" in report
    cost = result["drawing"]
    assert cost["passes"] == 16 and cost["seconds_per_picture"] > 0 and cost["mflops_per_picture"] > 0  # 4x4 codes
    assert (f"| {zero['draw']:.3f} | {zero['draw/ceiling']:.2f} | {zero['draw/fd']:.3f} | 16 | "
            f"{cost['seconds_per_picture']:.4f} |") in report
    assert "geneval_cost.png" in report and (tmp_path / "cmp" / "geneval_cost.png").stat().st_size > 0


def test_a_text_answer_never_opens_a_picture(loaded):
    from fusionlm.generate import Request, generate_ids

    model, tokenizer, config = loaded
    wanted = [model.ids.begin_image, model.code_offset + 3]  # the model wants to draw, or to write a code

    def keen(module, args, out):
        out = out.clone()
        out[..., wanted] += 1e4
        return out

    handle = model.llm.get_output_embeddings().register_forward_hook(keen)
    try:
        (ids,) = generate_ids(model, tokenizer, [Request("a red circle")], ImageSpec.for_model(model, config),
                              max_new_tokens=4)
    finally:
        handle.remove()
    assert len(ids) == 4 and not {model.ids.begin_image, model.ids.end_image, model.ids.code} & set(ids)
    assert all(i < model.code_offset for i in ids)


def test_the_reconstruction_ceiling_of_an_exact_code_is_one():
    from fusionlm.config import ImageTokenizerConfig
    from fusionlm.evaluate.drawing import reconstructed, reference_pictures
    from fusionlm.evaluate.geneval import geneval
    from fusionlm.data.world.scenes import geneval_scenes
    from fusionlm.image_tokenizers import build_image_tokenizer

    scenes = geneval_scenes(3)
    exact = build_image_tokenizer(ImageTokenizerConfig(kind="palette", image_size=64, downsample=1, codebook_size=7))
    coarse = build_image_tokenizer(ImageTokenizerConfig(kind="palette", image_size=64, downsample=8, codebook_size=7))
    pictures = reference_pictures(scenes, 64)
    assert geneval(scenes, pictures)["overall"] == 1.0
    assert geneval(scenes, reconstructed(exact, pictures))["overall"] == 1.0
    assert geneval(scenes, reconstructed(coarse, pictures))["overall"] < 0.5


def test_a_llava_json_with_the_picture_in_the_answer_trains_a_drawing_model(tmp_path):
    world = World(32, 0)
    records = []
    for i in range(4):
        sample = world.sample("draw", "train", i)
        sample.images[0].save(tmp_path / f"{i}.png")
        records.append({"id": f"t2i-{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": sample.messages[0]["content"]}, {"from": "gpt", "value": "<image>"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = drawing_dict()
    data["data"] = {"source": str(tmp_path / "data.json")}
    data["model"]["tokenizer"]["path"] = None
    for s in data["stages"]:
        s["mixture"], s["steps"] = {"custom": 1}, 2
    train(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 4 and rows[0]["psnr"] > 0 and rows[-1]["samples_trained"] == 16 and not rows[-1]["skipped"]
    model, tokenizer, config = load_model(tmp_path / "run")
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config, root=str(tmp_path)))
    prompted = prompts.sample(build_source(config.data).get("custom", "train", 2))
    assert torch.equal(prompted.drawn[0], prompts.draw.pixels(world.sample("draw", "train", 2).images[0]))


@pytest.mark.parametrize("header", [False, True], ids=["row_ends", "emu3_header"])
def test_emu3_rows_of_codes_end_with_their_token(tmp_path, header):
    """Row ends, and with ``header`` Emu3's whole picture: begin, "4*4", a header token, the rows,
    an end of frame, end. Trained as written; the sampler writes the same sequence."""
    data = drawing_dict("shared")
    data["model"]["generation"]["row_end_token"] = "<end_of_row>"
    if header:
        data["model"]["generation"].update(size_header=True, header_token="<image_codes>",
                                           frame_end_token="<end_of_frame>")
    for s in data["stages"]:
        s["steps"] = 1
    train(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None)
    model, tokenizer, config = load_model(tmp_path / "run")
    end = tokenizer.convert_tokens_to_ids("<end_of_row>")
    assert model.ids.row_end == end
    opening = [model.ids.begin_image]
    footer = []
    if header:
        opening += tokenizer("4*4", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<image_codes>")]
        footer = [tokenizer.convert_tokens_to_ids("<end_of_frame>")]
    prompted = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config)).sample(
        World(32, 0).sample("draw", "train", 0))
    ids, labels = prompted.encoded.input_ids, prompted.encoded.labels
    begin = ids.index(model.ids.begin_image)
    row = [model.ids.code] * 4 + [end]
    picture = opening + row * 4 + footer + [model.ids.end_image]
    assert ids[begin: begin + len(picture)] == picture
    assert labels[begin: begin + len(picture)] == picture  # the row ends (and header, footer) are learned too
    requests = [DrawRequest("a red circle", seed=1), DrawRequest("three squares", seed=2)]
    guided = Sampling(cfg=2.0)
    together = draw_codes(model, tokenizer, requests, sampling=guided)
    assert together.shape == (2, 4, 4)
    assert torch.equal(together, draw_codes(model, tokenizer, requests, sampling=guided, static=False))
    assert torch.equal(together[1:], draw_codes(model, tokenizer, requests[1:], sampling=guided))
    # the sampler writes the same sequence training reads: scores after the row ends match a forward pass
    (codes,) = draw_codes(model, tokenizer, requests[:1], sampling=Sampling(temperature=0.0))
    rows, _ = _rows(model, tokenizer, None, requests[:1], guided=False)
    assert rows[0][-len(opening):] == opening
    seq = rows[0] + [t for r in codes.tolist() for t in [c + model.code_offset for c in r] + [end]][:-1]
    out = model(torch.tensor([seq]))
    starts = [len(rows[0]) - 1 + k * 5 + j for k in range(4) for j in range(4)]  # positions that predict a code
    assert out.code_logits[0, starts].argmax(-1).tolist() == codes.flatten().tolist()
    # an answer that opens a picture writes the rest of it as training does, and draws draw()'s codes
    asked = [AnswerRequest("a red circle", seed=1)]
    with Opening(model, [0]):
        (drawn,) = answer(model, tokenizer, asked, sampling=Sampling(cfg=1.0, temperature=0.0), max_new_tokens=2)
    (reference,) = draw(model, tokenizer, [DrawRequest("a red circle", seed=1)], sampling=Sampling(cfg=1.0, temperature=0.0))
    assert len(drawn.pictures) == 1 and drawn.pictures[0].tobytes() == reference.tobytes()


def test_info_of_a_run_reports_what_its_stages_ended_at(run, capsys):
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    rows = read_metrics(run)
    tok, t2i = rows[2], rows[-1]  # the last step of each stage
    assert f"| tokenizer | 3 | {tok['loss']:.4f} | — | — | {tok['psnr']:.2f} | {tok['perplexity']:.1f} | " in out
    assert f"| t2i | 3 | {t2i['loss']:.4f} | {t2i['loss_text']:.4f} | {t2i['loss_image']:.4f} | — |" in out
    assert "codes per picture" in out


# ----------------------------------------------------------------------------- bad input


def test_bad_drawing_input_is_refused_with_a_clear_message(tmp_path, capsys):
    from fusionlm.data.pixels.video import Video
    from fusionlm.data.sample import Sample
    from fusionlm.errors import SampleError

    model, tokenizer, config = built(drawing_dict())
    clip = World(32, 0).sample("motion", "train", 0).images[0]
    assert isinstance(clip, Video)
    sample = Sample(id="t2v-0", task="x", messages=[{"role": "user", "content": "a red circle moving left"},
                                                    {"role": "assistant", "content": "<video>"}], images=[clip])
    with pytest.raises(SampleError, match="a model draws pictures, not clips"):
        PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config)).sample(sample)
    # a tokenizer stage on a mixture that draws nothing
    data = drawing_dict()
    data["stages"] = [stage("tokenizer", objective="reconstruction", train=["image_tokenizer"], mixture={"color": 1},
                            steps=1, batch_size=2)]
    from helpers_train import write_recipe

    assert main(["train", str(write_recipe(tmp_path / "r.yaml", data)), "--out", str(tmp_path / "run")]) == 2
    assert "the reconstruction objective trains the image tokenizer on the pictures a model draws" in \
        capsys.readouterr().err


def test_generate_image_out_refuses_a_model_that_only_reads_and_a_bad_count(tmp_path, capsys):
    from helpers_train import write_recipe

    data = tiny_dict(stages=[stage("s", steps=1, batch_size=2)])
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", data)), "--out", str(tmp_path / "reader")]) == 0
    capsys.readouterr()
    out = tmp_path / "x.png"
    assert main(["generate", "--checkpoint", str(tmp_path / "reader"), "--prompt", "a red circle",
                 "--image-out", str(out)]) == 2
    assert "this model does not draw (model.generation.kind: none)" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--checkpoint", str(tmp_path / "reader"), "--prompt", "a red circle",
              "--image-out", str(out), "--n", "0"])
    assert exc.value.code == 2 and "argument --n: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "reader"), "--prompt", "a red circle",
                 "--pictures-out", str(tmp_path / "answer")]) == 2
    assert "--pictures-out: this model does not draw" in capsys.readouterr().err
    assert not (tmp_path / "answer").exists()
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--checkpoint", str(tmp_path / "reader"), "--prompt", "a red circle",
              "--pictures-out", str(tmp_path / "answer"), "--image-out", str(out)])
    assert exc.value.code == 2 and "argument --pictures-out: not with --image-out" in capsys.readouterr().err
    assert not (tmp_path / "answer").exists() and not out.exists()


@pytest.mark.parametrize("kind", ["shared", "decoupled"])
def test_the_heads_on_target_positions_alone_give_the_same_loss_parts_and_gradients(kind):
    """Training's forward (``return_logits=False``) of a model that draws: its text and code losses,
    their parts and every gradient are those of the heads run at every position."""
    model, tokenizer, config = built(drawing_dict(kind))
    batch = _prompted_batch(model, tokenizer, config)
    got = []
    for fast in (False, True):
        model.zero_grad()
        out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                    labels=batch.labels, drawn=batch.drawn, loss_reduction="sum", loss_weights=(1.0, 0.5),
                    return_logits=not fast)
        out.loss.backward()
        got.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (every, grads), (targets, fast_grads) = got
    torch.testing.assert_close(targets.loss, every.loss, rtol=1e-6, atol=1e-6)
    assert {k: float(v) for k, v in targets.loss_parts.items()} == pytest.approx(
        {k: float(v) for k, v in every.loss_parts.items()}, rel=1e-6)
    assert float(every.loss_parts["image_targets"]) > 0 and grads.keys() == fast_grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-6, atol=1e-6, msg=name)
