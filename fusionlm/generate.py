"""Batched, KV-cached decoding: greedy or temperature/top-p sampling, stopping at end of turn
(or at any end id of the LLM's generation config).

Images are encoded once per request (for Method B their keys/values are projected once too) and
the same ``ImageContext`` is handed to every decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .data.pixels.processing import ImageBatch, ImageSpec
from .data.chat import PLACEHOLDERS
from .data.prompt import PromptEncoder
from .data.sample import Sample
from .data.pixels.video import placeholder
from .errors import SampleError
from .device import model_device
from .model import FusionLM
from .runtime import StaticDecoder, unsupported

# The one default answer budget: ``generate``, ``fusionlm generate``, the eval harness and the
# lmms-eval adapter all use it. Twice the longest answer of the synthetic world's eval tasks (a
# table, 23 tokens with the demo's tokenizer) and the harness's budget from the start, so the
# demo's scores (and which k-shot examples fit the context) do not change with it.
MAX_NEW_TOKENS = 48


@dataclass
class Request:
    """One question: a prompt (``<image>`` marks where each image goes, ``<video>`` each ``Video``)
    and its images and videos."""

    prompt: str
    images: list[Any] = field(default_factory=list)
    id: str = "request"
    history: list[dict[str, str]] = field(default_factory=list)  # earlier turns (few-shot examples…)

    def sample(self) -> Sample:
        prompt = self.prompt
        earlier = "".join(m["content"] for m in self.history)
        if self.images and not PLACEHOLDERS.search(prompt + earlier):
            prompt = "".join(f"{placeholder(item)}\n" for item in self.images) + prompt  # images first, as in training
        return Sample(id=self.id, task="request", messages=[*self.history, {"role": "user", "content": prompt}],
                      images=list(self.images))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """logits (B, V) -> the distribution (B, V) to sample from: at ``temperature``, only the ``top_k``
    most likely tokens (0: all), then only the smallest set whose probability reaches ``top_p``."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs / probs.sum(-1, keepdim=True)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


class GeneralDecoder:
    """Decoding through transformers' own forward pass: its dynamic KV cache, or without a cache
    (``use_cache=False``) the whole sequence again at every step. Any LLM; the reference that
    ``StaticDecoder`` is tested against."""

    def __init__(self, model: FusionLM, use_cache: bool, *, scores: str = "logits"):
        """``scores``: the output read at each step, ``logits`` (text), ``code_logits`` (a drawing's
        codes) or ``both`` (the two, a pair)."""
        self.model, self.use_cache, self.past, self.scores = model, use_cache, None, scores

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context) -> torch.Tensor:
        """The prompts (B, T), left-padded where ``attention_mask`` is 0 -> next-token logits (B, V)."""
        self.seq, self.mask, self.context = input_ids, attention_mask, context
        return self._run(input_ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> next-token logits (B, V)."""
        self.seq = torch.cat([self.seq, tokens[:, None]], dim=1)  # (B, T+1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        return self._run(tokens[:, None])

    def _run(self, new_ids: torch.Tensor) -> torch.Tensor:
        position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding shifts positions
        if not self.use_cache:
            out = self.model(self.seq, attention_mask=self.mask, position_ids=position_ids, context=self.context)
            return self._read(out)
        start = self.seq.shape[1] - new_ids.shape[1]
        result = self.model(new_ids, attention_mask=self.mask, position_ids=position_ids[:, start:], context=self.context,
                            past_key_values=self.past, use_cache=True, query_start=start)
        self.past = result.past_key_values
        return self._read(result)

    def _read(self, out):
        """The last position's scores: (B, V) text logits, (B, K) code scores, or both."""
        if self.scores == "both":
            return out.logits[:, -1], None if out.code_logits is None else out.code_logits[:, -1]
        return getattr(out, self.scores)[:, -1]


def generate(model: FusionLM, tokenizer, requests: list[Request], spec: ImageSpec, **kwargs) -> list[str]:
    """Answers for a batch of requests, in order (``generate_ids``' tokens, decoded)."""
    out = generate_ids(model, tokenizer, requests, spec, **kwargs)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]


def encode_requests(model: FusionLM, tokenizer, requests: list[Request], spec: ImageSpec,
                    max_length: int) -> tuple[torch.Tensor, torch.Tensor, ImageBatch | None]:
    """Prompts, left-padded (ids and mask, each (B, T)), and their images in order.

    Raises:
        SampleError: a prompt whose ``<image>`` count differs from its images, or that does not
            fit in ``max_length``.
        ImageError: an image that cannot be read.
    """
    prompts = PromptEncoder.of(model, tokenizer, spec, max_length=max_length)
    rows, inputs = [], []
    for req in requests:
        prompted = prompts.request(req)
        rows.append(model.coded(prompted.encoded.input_ids, prompted.drawn))
        inputs.extend(prompted.inputs)
    ids, mask = left_pad(rows, tokenizer.pad_token_id)  # (B, T)
    return ids, mask, ImageBatch.collate(inputs)


def never_written(model: FusionLM, *, opening: bool = False) -> list[int]:
    """The ids a text answer never writes: the image and image-newline tokens (nothing stands behind
    them) and a drawing model's picture tokens. ``opening``: the answer may open a picture
    (``converse``), so ``<begin_of_image>`` is left out (a text answer of ``generate`` never opens
    one: ``draw`` draws)."""
    ids = model.ids
    drawing = {ids.end_image, ids.code, ids.row_end, ids.header, ids.frame_end} | ({ids.begin_image} if not opening else set())
    if model.draws:  # and the codes themselves (a shared vocabulary's LM head scores them; runtime's decoder does not mask them)
        drawing |= set(model.code_ids().tolist())
    return sorted(({ids.image, ids.newline} | (drawing if model.draws else set())) - {-1})


def stop_ids(model: FusionLM) -> list[int]:
    """The ids that end an answer: the model's end of turn, and every end id (an int or a list)
    of its LLM's ``generation_config`` (an instruct model may have several, e.g. Llama 3's
    ``<|eot_id|>`` and ``<|end_of_text|>``)."""
    config = getattr(model.llm, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    extra = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted({model.ids.end, *(int(i) for i in extra)})


@torch.no_grad()
def generate_ids(model: FusionLM, tokenizer, requests: list[Request], spec: ImageSpec, *,
                 max_new_tokens: int = MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
                 max_length: int | None = None, static: bool = True, compile: bool = False) -> list[list[int]]:
    """The new token ids of each request, without the token that ended it (``stop_ids``).

    ``static``: decode through ``runtime.StaticDecoder`` where the LLM allows (else, and with
    ``static=False``, through transformers' forward pass; ``use_cache=False`` recomputes the
    whole sequence at every step). ``compile``: its decoding step through ``torch.compile`` (the
    first request of a batch size pays the compilation; later ones decode about twice as fast).

    Raises:
        SampleError: a prompt whose ``<image>`` count differs from its images, or that does not
            fit the context.
        ImageError: an image that cannot be read.
    """
    max_length = max_length or model.config.llm.max_length
    ids, mask, pixels = encode_requests(model, tokenizer, requests, spec, max_length)
    budget = min(max_new_tokens, max_length - ids.shape[1])
    if budget <= 0:
        raise SampleError(f"the prompt takes {ids.shape[1]} tokens, leaving no room in the context of {max_length}")
    device = model_device(model)
    ids, mask = ids.to(device), mask.to(device)
    context = model.encode_images(pixels.to(device), ids) if pixels is not None else None
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    length = ids.shape[1] + budget
    if use_cache and static and unsupported(model, length) is None:
        decoder = StaticDecoder(model, len(ids), length, compile=compile)
    else:
        decoder = GeneralDecoder(model, use_cache)
    end = set(stop_ids(model))
    never = torch.tensor(never_written(model), device=device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(len(ids))]
    logits = decoder.prefill(ids, mask, context)  # (B, V)
    for step in range(budget):
        # An image token has no image behind it: generating one would break the next step. (Llama 3.2
        # Vision's lies past the LM head's rows: it cannot be generated at all.)
        logits = logits.index_fill(-1, never[never < logits.shape[-1]], float("-inf"))
        token = next_tokens(logits, temperature, top_p, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, tokenizer.pad_token_id), token)
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                if t in end:
                    done[i] = True
                else:
                    out[i].append(t)
        if bool(done.all()) or step == budget - 1:
            break
        logits = decoder.step(token)
    return out
