"""The LM head on target positions alone: one training step (forward + backward) of fusionlm's
forward with the head at every position (``return_logits=True``) against the head on the positions
that have a target (``return_logits=False``, what training runs), on the demo's instruction mix,
for a small vocabulary and for SmolLM's 49,152 tokens; the losses must agree.

    python benchmarks/head_at_targets.py
"""

from __future__ import annotations

import torch

from common import machine, print_table, timed_alternately
from fusionlm.checkpoint import build_model
from fusionlm.config import from_dict, validate
from fusionlm.data.batching.batches import collate
from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.sources import build_source
from fusionlm.recipe import make_tokenizer

TASKS = ["color", "shape", "count", "caption", "chart", "price", "position", "table"]

WIDTH, LAYERS = 576, 2  # SmolLM-135M's width, few layers so that it runs here


def setup(vocab: int | None):
    from helpers_train import stage, tiny_dict

    data = tiny_dict()
    data["model"]["llm"].update(hidden_size=WIDTH, num_layers=LAYERS, num_heads=9, num_kv_heads=3,
                                intermediate_size=1536, max_length=256)
    data["model"]["encoder"].update(image_size=64, patch_size=16)
    data["stages"] = [stage("instruct", mixture={t: 1 for t in TASKS}, batch_size=16)]
    config = validate(from_dict(data))
    source = build_source(config.data)
    tokenizer = make_tokenizer(config, source)
    torch.manual_seed(0)
    model = build_model(config, tokenizer).train()
    if vocab is not None:  # a real vocabulary: the head's rows past the tokenizer's are never targets
        model.llm.resize_token_embeddings(vocab, mean_resizing=False)
    prompts = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config))
    done = [prompts.sample(source.get(TASKS[i % len(TASKS)], "train", i)) for i in range(16)]  # the instruction mix
    batch = collate(done, ["x"] * len(done), [], tokenizer.pad_token_id)
    return model, batch


def step(model, batch, return_logits: bool):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                    labels=batch.labels, loss_reduction="sum", return_logits=return_logits)
        out.loss.backward()
        return out.loss.detach()
    return run


def main() -> None:
    rows = []
    for vocab in (None, 49_152):
        model, batch = setup(vocab)
        every, targets = step(model, batch, True), step(model, batch, False)
        difference = abs(float(every()) - float(targets()))
        t_every, t_targets = timed_alternately(every, targets)
        positions = batch.input_ids.numel()
        with_target = int((batch.labels[:, 1:] != -100).sum())
        size = model.llm.get_output_embeddings().weight.shape[0]
        rows.append(f"| {size:,} | {positions} | {with_target} | {t_every * 1000:.0f} | {t_targets * 1000:.0f} | "
                    f"**{t_every / t_targets:.2f}×** | {difference:.1e} |")
    print(f"machine: {machine()}; LLM {WIDTH} wide, {LAYERS} layers; one forward + backward, medians of 7 in turn")
    print_table(["vocabulary", "positions", "with a target", "head everywhere ms", "head at targets ms", "ratio",
                 "|loss difference|"], "rrrrrrr", rows)


if __name__ == "__main__":
    main()
