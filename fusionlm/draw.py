"""Drawing: a model that draws (``model.generation``) turns prompts into pictures.

Each prompt is asked as a conversation whose answer starts with ``<begin_of_image>``; the model then
writes the image tokenizer's grid of codes one by one over a KV cache (``runtime.StaticDecoder``
where the LLM allows, with the design's code head in place of the LM head), and the tokenizer
decodes them. Only code scores exist inside an image, so every answer is exactly one grid.

Classifier-free guidance (``cfg`` > 1) runs each prompt's null prompt (``data.drawing.null_prompt``,
the one condition dropout trains on) as a second row of the same batch: the scores sampled from
are ``null + cfg * (conditional - null)``. Each request samples with a generator of its own seed,
so its picture does not depend on which other prompts share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .data.chat import SkipSample
from .data.drawing import DrawLayout, null_prompt
from .data.pixels.processing import ImageBatch, ImageSpec
from .data.prompt import PromptEncoder
from .data.sample import Sample
from .device import model_device
from .errors import ConfigError, SampleError
from .generate import GeneralDecoder, left_pad, sampling_probs
from .generators import Noised
from .image_tokenizers import images_of
from .model import FusionLM
from .runtime import StaticDecoder, unsupported


@dataclass
class DrawRequest:
    """One picture to draw: a prompt (with ``<image>`` where pictures it shows go), and its seed."""

    prompt: str
    seed: int = 0
    images: list[Any] = field(default_factory=list)
    id: str = "draw"

    def sample(self) -> Sample:
        return Sample(id=self.id, task="draw", messages=[{"role": "user", "content": self.prompt}],
                      images=list(self.images))


@dataclass(frozen=True)
class Sampling:
    """How codes are chosen: ``cfg`` the guidance scale (1: none), then temperature, top-k, top-p
    (temperature 0: the most likely code)."""

    cfg: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    steps: int = 8  # an iterative design (masked): the parallel passes that draw an image

    @classmethod
    def of(cls, generation, **given) -> "Sampling":
        """The way a model draws unless told otherwise (its ``model.generation``: cfg, temperature,
        top_k), with each of ``given`` that is not None in place of its default."""
        defaults = {"cfg": generation.cfg, "temperature": generation.temperature, "top_k": generation.top_k,
                    "steps": generation.steps}
        return cls(**{**defaults, **{k: v for k, v in given.items() if v is not None}})

    def check(self) -> None:
        if self.cfg < 0 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.steps < 1:
            raise ConfigError(f"sampling: cfg, temperature and top_k must be >= 0, top_p in (0, 1] and steps >= 1, "
                              f"got {self}")


def _rows(model: FusionLM, tokenizer, spec: ImageSpec | None, requests: list, guided: bool, *, opened: bool = True):
    """The prompts' ids (each ending in a picture's opening where ``opened``), conditional rows then
    (guided) null rows, and the pictures they show, in row order."""
    prompts = PromptEncoder.of(model, tokenizer, spec)
    samples = [r.sample() for r in requests]
    rows, inputs = [], []
    style = model.config.generation.null_prompt
    layout = DrawLayout.of(model)
    opening = layout.opening if layout is not None and opened else []
    for sample in samples + ([null_prompt(s, style) for s in samples] if guided else []):
        try:
            prompted = prompts.sample(sample, generation_prompt=True)
        except SkipSample as exc:  # over the context: a request is refused, never dropped
            raise SampleError(str(exc)) from None
        rows.append(model.coded(prompted.encoded.input_ids, prompted.drawn) + opening)
        inputs.extend(prompted.inputs)
    longest = max(len(r) for r in rows)
    written = layout.written if opening else 0
    if longest + written > model.config.llm.max_length:
        raise SampleError(f"a prompt of {longest} tokens and an image of {written} positions do not fit the context "
                          f"of {model.config.llm.max_length}")
    return rows, ImageBatch.collate(inputs)


@torch.no_grad()
def draw_codes(model: FusionLM, tokenizer, requests: list[DrawRequest], spec: ImageSpec | None = None, *,
               sampling: Sampling = Sampling(), static: bool = True, compile: bool = False) -> torch.Tensor:
    """The codes (B, h, w) of one picture per request. ``compile``: the decoding step through
    ``torch.compile`` (``runtime.StaticDecoder``; the first request of a batch size compiles)."""
    if not model.draws:
        raise ConfigError("this model does not draw (model.generation.kind: none)")
    sampling.check()
    guided = sampling.cfg != 1.0
    layout = DrawLayout.of(model)
    rows, pixels = _rows(model, tokenizer, spec, requests, guided)
    device = model_device(model)
    ids, mask = (t.to(device) for t in left_pad(rows, tokenizer.pad_token_id))  # (R, T)
    context = model.encode_images(pixels.to(device), ids) if pixels is not None else None
    generators = [torch.Generator(device).manual_seed(r.seed) for r in requests]
    if model.generation.iterative:
        sampler = PARALLEL[model.generation.parallel]
        return sampler(model, ids, mask, context, sampling, generators).unflatten(1, layout.grid)  # (B, h, w[, C])
    n = layout.codes
    length = ids.shape[1] + layout.written
    if static and unsupported(model, length) is None:
        decoder = StaticDecoder(model, len(ids), length, compile=compile)
        decoder.head = model.generation.code_head(model)
    else:
        decoder = GeneralDecoder(model, True, scores="code_logits")
    b = len(requests)
    codes = torch.zeros(b, n, dtype=torch.long, device=device)
    scores = decoder.prefill(ids, mask, context)  # (R, K)
    # after the opening: the code slots, with any row ends between them (Emu3), written, not sampled
    places = layout.tokens()[len(layout.opening):]
    places = places[: max(j for j, t in enumerate(places) if t == layout.code) + 1]
    i = 0
    for j, place in enumerate(places):
        if place == layout.code:
            guided_scores = scores[b:] + sampling.cfg * (scores[:b] - scores[b:]) if guided else scores  # (B, K)
            codes[:, i] = pick(guided_scores, sampling, generators)
            token = (codes[:, i] + model.code_offset).repeat(2 if guided else 1)  # (R,)
            i += 1
        else:
            token = torch.full((len(ids),), place, device=device)  # (R,)
        if j + 1 < len(places):
            scores = decoder.step(token)
    return codes.view(b, *layout.grid)


def with_picture(ids: torch.Tensor, mask: torch.Tensor, n: int, fill: int) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts ``ids`` / ``mask`` (R, T), each ending in a picture's opening, followed by
    the picture's ``n`` positions holding ``fill``: the ids, attention mask and positions (R, T+n)
    (left padding shifts the positions) that a parallel sampler runs each pass."""
    seq = torch.cat([ids, ids.new_full((len(ids), n), fill)], 1)  # (R, T+n)
    full = torch.cat([mask, mask.new_ones(len(ids), n)], 1)  # (R, T+n)
    return seq, full, (full.cumsum(-1) - 1).clamp(min=0)


# MaskGIT's choice temperature: which codes a pass keeps is chosen by confidence plus Gumbel noise
# of this scale, falling linearly to none at the last pass (with temperature 0: no noise)
CHOICE_TEMPERATURE = 4.5


def unmask(model: FusionLM, ids: torch.Tensor, mask: torch.Tensor, context, sampling: Sampling,
           generators: list[torch.Generator]) -> torch.Tensor:
    """Show-o's (MaskGIT's) parallel decoding: the prompts ``ids`` (R, T), each ending in a picture's
    opening (conditional rows, then with guidance their null rows), followed by all the image's
    codes as ``[MASK]``; each pass scores every code at once (the image's positions see each other),
    samples a candidate for each still masked code and keeps the most confident ones (their
    log-probability plus annealed Gumbel noise, ``CHOICE_TEMPERATURE``), so that
    ``n cos(pi/2 (s+1)/S)`` stay masked after pass s of S. Returns the codes (B, n)."""
    b, t = len(generators), ids.shape[1]
    n = math.prod(model.image_tokenizer.grid)
    blank = model.generation.mask_id(model)
    seq, full, positions = with_picture(ids, mask, n, blank)  # (R, T+n) each
    codes = ids.new_zeros(b, n)  # (B, n)
    known = torch.zeros(b, n, dtype=torch.bool, device=ids.device)  # (B, n)
    for step in range(sampling.steps):
        # the opening and the codes see each other both ways (the design's blocks)
        scores = model(seq, attention_mask=full, position_ids=positions,
                       context=context).code_logits[:, t - 1: t - 1 + n]  # (R, n, K): position i-1 scores code i
        if len(ids) > b:  # guided: the null rows follow
            scores = scores[b:] + sampling.cfg * (scores[:b] - scores[b:])  # (B, n, K)
        probs, candidates = pick_each(scores, sampling, generators)  # (B, n, K), (B, n)
        confidence = probs.gather(-1, candidates[..., None]).squeeze(-1).clamp(min=1e-30).log()  # (B, n)
        anneal = CHOICE_TEMPERATURE * (1 - (step + 1) / sampling.steps)
        if anneal > 0 and sampling.temperature > 0:  # MaskGIT's randomised choice: Gumbel noise, annealed to none
            uniform = torch.stack([torch.rand(n, generator=g, device=ids.device) for g in generators])  # (B, n)
            confidence = confidence - anneal * torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
        confidence = confidence.masked_fill(known, float("inf"))
        left = math.floor(n * math.cos(math.pi / 2 * (step + 1) / sampling.steps))  # still masked after this pass
        chosen = torch.zeros_like(known).scatter(1, confidence.topk(n - left, dim=1).indices, True)  # (B, n)
        codes = torch.where(chosen & ~known, candidates, codes)
        known |= chosen
        written = torch.where(known, codes + model.code_offset, blank)  # (B, n)
        seq[:, t:] = written.repeat(len(ids) // b, 1)
    return codes


# VAR's guidance schedule over the scales: none on the first, cfg on the last (False: cfg on every
# scale; experiments/var_ramp.py compares the two)
CFG_RAMP = True


def by_scale(model: FusionLM, ids: torch.Tensor, mask: torch.Tensor, context, sampling: Sampling,
             generators: list[torch.Generator]) -> torch.Tensor:
    """VAR's next-scale decoding: the prompts ``ids`` (R, T) as in ``unmask``, followed by the
    picture's code slots; pass s scores every code of scale s at once (its positions see the coarser
    scales' reconstruction, ``generators.NextScale``) and samples them all. Guidance ramps over the
    scales as in VAR: none on the first, ``cfg`` on the last (linear between). Returns the codes (B, n)."""
    b, t = len(generators), ids.shape[1]
    tok = model.image_tokenizer
    n = tok.grid[1]
    seq, full, positions = with_picture(ids, mask, n, model.code_offset)  # (R, T+n): scales not drawn yet read as code 0
    codes = ids.new_zeros(b, n)  # (B, n)
    spans = tok.spans()
    for s, (start, end) in enumerate(spans):
        # a later scale's slots are not seen from this one's positions (block-causal), whatever they hold
        scores = model(seq, attention_mask=full, position_ids=positions,
                       context=context).code_logits[:, t - 1 + start: t - 1 + end]  # (R, m, K)
        if len(ids) > b:  # guided: the null rows follow; VAR's ramp
            cfg = 1 + (sampling.cfg - 1) * s / max(1, len(spans) - 1) if CFG_RAMP else sampling.cfg
            scores = scores[b:] + cfg * (scores[:b] - scores[b:])  # (B, m, K)
        _, picked = pick_each(scores, sampling, generators)  # (B, m)
        codes[:, start:end] = picked
        seq[:, t + start: t + end] = (picked + model.code_offset).repeat(len(ids) // b, 1)
    return codes


def denoise(model: FusionLM, ids: torch.Tensor, mask: torch.Tensor, context, sampling: Sampling,
            generators: list[torch.Generator]) -> torch.Tensor:
    """Transfusion's drawing, as flow matching: the prompts ``ids`` (R, T) as in ``unmask``, followed
    by the picture's positions holding pure noise (each request's own generator); each of
    ``sampling.steps`` passes predicts the velocity of every patch at once (the picture's positions
    see each other) and takes an Euler step of the flow towards the picture, on diffusers'
    ``FlowMatchEulerDiscreteScheduler``'s noise levels. Guidance as for the other designs, on the
    velocity. Temperature and top-k do not apply. Returns the patches (B, n, C)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    b, tok = len(generators), model.image_tokenizer
    n, c = math.prod(tok.grid), tok.config.code_dim
    seq, full, positions = with_picture(ids, mask, n, model.ids.code)  # (R, T+n) each
    x = torch.stack([torch.randn(n, c, generator=g, device=ids.device) for g in generators])  # (B, n, C)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(sampling.steps, device=ids.device)
    for level in scheduler.timesteps:
        times = (level / scheduler.config.num_train_timesteps).float().expand(len(ids))  # (R,)
        rows = Noised(x.repeat(len(ids) // b, 1, 1), times)
        v = model(seq, attention_mask=full, position_ids=positions, context=context, pictures=rows).velocity  # (R, n, C)
        if len(ids) > b:  # guided: the null rows follow
            v = v[b:] + sampling.cfg * (v[:b] - v[b:])  # (B, n, C)
        x = scheduler.step(v.float(), level, x.float()).prev_sample.to(x.dtype)
    return x


# the sampler of each design that draws a picture in passes over all of it (``Generator.parallel``)
PARALLEL = {"unmask": unmask, "by_scale": by_scale, "denoise": denoise}


def passes(model: FusionLM, sampling: Sampling) -> int:
    """Decoder passes that draw one picture: a masked or diffusion design's steps and a next-scale
    design's scales (each pass over the whole sequence), else a prefill and one cached step per written
    position after the first."""
    parallel = model.generation.passes(model, sampling.steps)
    return DrawLayout.of(model).written if parallel is None else parallel


def pick_each(scores: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, m, K) of m codes drawn at once -> the probabilities sampled from (B, m, K) and a
    code for each (B, m), row i drawn with ``generators[i]`` alone (temperature 0: the most likely)."""
    b, m, k = scores.shape
    if sampling.temperature <= 0:
        probs = torch.softmax(scores.float(), -1)  # (B, m, K)
        return probs, probs.argmax(-1)
    probs = sampling_probs(scores.flatten(0, 1), sampling.temperature, sampling.top_p, sampling.top_k).view(b, m, k)
    return probs, torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, generators)])


def pick(scores: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """scores (B, K) -> one code per row (B,), row i drawn with ``generators[i]`` alone."""
    if sampling.temperature <= 0:
        return scores.argmax(-1)
    probs = sampling_probs(scores, sampling.temperature, sampling.top_p, sampling.top_k)  # (B, K)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def draw(model: FusionLM, tokenizer, requests: list[DrawRequest], spec: ImageSpec | None = None, **kwargs) -> list[Image.Image]:
    """One PIL picture per request (``draw_codes``, decoded by the model's image tokenizer)."""
    codes = draw_codes(model, tokenizer, requests, spec, **kwargs)
    return images_of(model.image_tokenizer.decode(codes))
