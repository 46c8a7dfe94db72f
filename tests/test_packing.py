"""Packing: several samples per row give the same loss as one sample per row, with less padding."""

from __future__ import annotations

import pytest
import torch

from fusionlm.checkpoint import build_model
from fusionlm.config import from_dict, load_recipe, shipped_recipes, validate
from fusionlm.data.batching.batches import ImageSpec, MixtureBatches
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.sources import build_source
from fusionlm.recipe import make_tokenizer
from fusionlm.train.loop import packing
from fusionlm.train.objectives import objective_for
from fusionlm.data.batching.packing import Packing, pack_rows, segment_positions
from conftest import tiny_config

ITEMS = [("color", 0), ("text_only", 1), ("price", 0), ("caption", 2), ("interleaved", 0), ("shape", 3),
         ("interleaved", 1), ("count", 4)]

DESIGNS = {  # every design that reads images, with the settings that change what a sample may see
    "unified": {}, "fuyu": {},
    "cross_attention": {}, "cross_attention latest": {"fusion": {"visibility": "latest"}},
    "hybrid": {"tiling": {"max_tiles": 2, "marker": "none"}},
    "unified tiles": {"tiling": {"max_tiles": 2}, "llm": {"max_length": 256}},
}


class Widest(Packing):
    """Rows of ``max_length``, as full as they get: the most samples to keep apart."""

    def candidates(self, lengths):
        return [self.max_length]


def model_for(name: str, tokenizer):
    torch.manual_seed(0)
    fusion = name.split()[0]
    config = tiny_config("fuyu" if fusion == "fuyu" else "unified")
    config.model.fusion.kind = fusion
    for section, values in DESIGNS[name].items():
        for key, value in values.items():
            setattr(getattr(config.model, section), key, value)
    model = build_model(validate(config), tokenizer).eval()
    with torch.no_grad():  # open gates: with closed ones a sample could see every image and nothing would show it
        for block in model.cross_blocks.values():
            block.attn_gate.fill_(0.7)
            block.ffn_gate.fill_(0.7)
    return model


@pytest.mark.parametrize("design", list(DESIGNS))
def test_packed_rows_give_each_sample_its_unpacked_loss(design, tokenizer, world, make_batch):
    """Per sample, not only in sum: a sample that saw another's images or text would change its own."""
    model = model_for(design, tokenizer)
    plain, packed = make_batch(model, ITEMS), make_batch(model, ITEMS, pack=Widest(model.config.llm.max_length, 32))
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]  # fewer rows
    assert packed.num_tokens == plain.num_tokens and 1 - packed.num_tokens / packed.input_ids.numel() < 0.25
    targets = lambda batch: int((batch.labels[:, 1:] != -100).sum())  # noqa: E731  (what the loss reads)
    assert targets(packed) == targets(plain)
    with torch.no_grad():
        a = model(plain.input_ids, attention_mask=plain.attention_mask, pixel_values=plain.pixels,
                  labels=plain.labels).logits
        b = model(packed.input_ids, pixel_values=packed.pixels, labels=packed.labels,
                  segment_ids=packed.segments).logits
    for row, sid in enumerate(plain.sample_ids):  # each sample's logits at its own positions
        r, s = next((r, s) for r, ids in enumerate(packed_ids(packed)) for s, x in enumerate(ids, 1) if x == sid)
        mine = packed.segments[r] == s
        n = int(mine.sum())
        assert n == int(plain.attention_mask[row].sum())
        torch.testing.assert_close(b[r, mine], a[row, :n], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        plain_loss = model(plain.input_ids, attention_mask=plain.attention_mask, pixel_values=plain.pixels,
                           labels=plain.labels, return_logits=False).loss
        packed_loss = model(packed.input_ids, pixel_values=packed.pixels, labels=packed.labels,
                            segment_ids=packed.segments, return_logits=False).loss
    assert float(packed_loss) == pytest.approx(float(plain_loss), rel=1e-5)
    if "cross" in design or "hybrid" in design:  # the images reach the text: packing has something to keep apart
        with torch.no_grad():
            for block in model.cross_blocks.values():
                block.attn_gate.zero_()
                block.ffn_gate.zero_()
            closed = model(plain.input_ids, attention_mask=plain.attention_mask, pixel_values=plain.pixels,
                           labels=plain.labels).loss
        assert float(closed) != pytest.approx(float(plain_loss), rel=1e-4)


def packed_ids(batch):
    """The sample ids of each packed row, in order."""
    rows, k = [], 0
    for r in range(batch.segments.shape[0]):
        n = int(batch.segments[r].max())
        rows.append(batch.sample_ids[k:k + n])
        k += n
    return rows


def test_rows_and_positions():
    assert pack_rows([5, 4, 3, 6, 1], 10) == [[3, 1], [0, 2, 4]]  # first fit, longest first
    assert pack_rows([7, 7, 7], 7) == [[0], [1], [2]]
    wide, narrow = Packing(256, 4096), Packing(256, 8)  # attention is cheap next to the products / dear
    assert wide.width([40, 33, 33]) == 128 and narrow.width([40, 33, 33]) == 64
    assert Packing(48, 64).width([5, 40]) == 48 and Packing(48, 64).width([50]) == 50
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]]


def test_a_packed_run_trains(tmp_path):
    from fusionlm.train.loop import train
    from helpers_train import read_metrics, stage, tiny_dict

    data = tiny_dict()
    data["data"]["pack"] = True
    data["stages"] = [stage("s", steps=12, mixture={"color": 1, "text_only": 1, "caption": 1})]
    train(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize("recipe", [r for r in shipped_recipes() if load_recipe(r).model.generation.kind == "none"])
def test_each_shipped_recipe_packs_its_last_stage_exactly(recipe):
    """What a recipe trains by default: its last stage's batch packed (as the loop packs it, and as
    full as rows get) gives the loss of the same samples one per row, with the gates open."""
    config = load_recipe(recipe)
    source = build_source(config.data)
    tokenizer = make_tokenizer(config, source)
    torch.manual_seed(0)
    model = build_model(config, tokenizer).eval()
    with torch.no_grad():
        for block in model.cross_blocks.values():
            block.attn_gate.fill_(0.7)
            block.ffn_gate.fill_(0.7)
    index = len(config.stages) - 1
    stage = config.stages[index]
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config, root=source.root))
    chosen = packing(config, model, objective_for(stage))
    assert chosen is not None  # packed by default
    losses = []
    for pack in (None, chosen, Widest(chosen.max_length, chosen.hidden_size)):
        batch = MixtureBatches(source, stage.mixture, seed=0, stage=index, batch_size=12, prompts=prompts,
                               pack=pack)[0]
        with torch.no_grad():
            losses.append(float(model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                                      labels=batch.labels, segment_ids=batch.segments, return_logits=False).loss))
        if pack is not None:
            assert batch.segments is not None and batch.input_ids.shape[0] < 12
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("recipe", ["janus", "llava"])
def test_length_grouped_micro_batches_keep_the_step(recipe):
    """One sample per row, grad_accum 3: the step's samples regrouped by length across its micro-batches
    (janus draws, so it is not packed; llava with packing off). The same samples, less padding, and
    the step's summed loss unchanged; a contrastive stage is left as drawn."""
    config = load_recipe(recipe)
    source = build_source(config.data)
    tokenizer = make_tokenizer(config, source)
    torch.manual_seed(0)
    model = build_model(config, tokenizer).eval()
    index = len(config.stages) - 1
    stage = config.stages[index]
    objective = objective_for(stage)
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config, root=source.root))
    steps = {}
    for grouped in (False, True):
        data = MixtureBatches(source, stage.mixture, seed=0, stage=index, batch_size=4, prompts=prompts, grad_accum=3,
                              group_by_length=grouped)
        assert data.group_by_length == grouped
        micro = [data[k] for k in range(3, 6)]  # step 1
        with torch.no_grad():
            loss = sum(float(objective.loss(model, b).train) for b in micro)
        steps[grouped] = (micro, loss)
    (plain, plain_loss), (grouped, grouped_loss) = steps[False], steps[True]
    assert sorted(i for b in grouped for i in b.sample_ids) == sorted(i for b in plain for i in b.sample_ids)
    assert [len(b.sample_ids) for b in grouped] == [4, 4, 4]
    lengths = [b.attention_mask.sum(1).tolist() for b in grouped]  # each row's tokens
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))  # shortest first
    assert sum(b.input_ids.numel() for b in grouped) < sum(b.input_ids.numel() for b in plain)
    assert grouped_loss == pytest.approx(plain_loss, rel=1e-5)
    align = load_recipe("demo").stages[0]
    assert align.objective == "contrastive" and not objective_for(align).packs  # what the loop groups by
