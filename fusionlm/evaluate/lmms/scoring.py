"""Log-likelihood of a continuation after a prompt, encoded exactly as ``generate`` encodes it."""

from __future__ import annotations

from typing import Sequence

import torch

from ...data.pixels.processing import ImageBatch, ImageSpec
from ...data.prompt import PromptEncoder
from ...device import model_device
from ...errors import SampleError
from ...generate import Request


def encode_prompt(model, tokenizer, spec: ImageSpec, request: Request) -> tuple[list[int], list]:
    """The prompt's token ids (image layouts expanded, generation prompt added) and its encoder
    inputs: exactly what ``generate`` feeds the model for ``request``."""
    prompted = PromptEncoder.of(model, tokenizer, spec).request(request)
    return model.coded(prompted.encoded.input_ids, prompted.drawn), prompted.inputs  # early fusion: its codes


def continuation_score(logits: torch.Tensor, targets: torch.Tensor,
                       never: torch.Tensor | None = None) -> tuple[float, bool]:
    """(sum of log-probs, greedy) of ``targets`` (N,) under ``logits`` (N, V), row i predicting
    ``targets[i]``. ``greedy``: each target is the argmax of its row, with the ids in ``never``
    (tokens ``generate`` never emits: image, image-newline) left out of the argmax."""
    if targets.numel() == 0:
        return 0.0, True
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None].long()).sum()
    if never is not None and never.numel():
        never = never[never < logits.shape[-1]].to(logits.device)
        logits = logits.index_fill(-1, never, float("-inf"))
    return float(logp), bool((logits.argmax(-1) == targets).all())


@torch.no_grad()
def loglikelihoods(model, tokenizer, spec: ImageSpec, pairs: Sequence[tuple[Request, str]], *,
                   batch_size: int = 1) -> list[tuple[float, bool]]:
    """(log P(continuation | prompt), greedy) for each (request, continuation), in order.

    The prompt is encoded as ``generate`` encodes it; the continuation is tokenized on its own
    (no special tokens) and appended, so its tokens are those the model would have to generate
    after the generation prompt. Rows are right-padded in batches of ``batch_size``; a row's score
    does not depend on the batch it is in. Raises ``SampleError`` for a prompt + continuation
    longer than the model's context.
    """
    rows: list[tuple[list[int], int, list]] = []  # (ids, prompt length, encoder inputs)
    for request, continuation in pairs:
        prompt, inputs = encode_prompt(model, tokenizer, spec, request)
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else []
        ids = prompt + cont
        if len(ids) > model.config.llm.max_length:
            raise SampleError(f"request {request.id}: prompt and continuation take {len(ids)} tokens, over the "
                              f"context of {model.config.llm.max_length}")
        if not prompt:
            raise SampleError(f"request {request.id}: the prompt encodes to no token")
        rows.append((ids, len(prompt), inputs))
    device = model_device(model)
    never = torch.tensor(sorted({model.ids.image, model.ids.newline}))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start:start + max(1, batch_size)]
        width = max(len(rows[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        inputs = []
        for b, i in enumerate(chunk):
            row = rows[i][0]
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
            inputs.extend(rows[i][2])
        pixels = ImageBatch.collate(inputs)
        result = model(ids.to(device), attention_mask=mask.to(device),
                       pixel_values=pixels.to(device) if pixels is not None else None)
        for b, i in enumerate(chunk):
            row, n_prompt, _ = rows[i]
            targets = torch.tensor(row[n_prompt:], device=device)
            out[i] = continuation_score(result.logits[b, n_prompt - 1:len(row) - 1], targets, never)
    return out  # type: ignore[return-value]
