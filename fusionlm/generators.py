"""The generation designs: how a model's LLM draws, one class per design behind ``GENERATORS``.

A drawn image is written into the sequence as ``<begin_of_image>``, one position per code of the
image tokenizer's grid (raster order), ``<end_of_image>``. Whatever the design, a code ``c`` sits in
``input_ids`` as the id ``code_offset + c`` (ids past the text vocabulary), so sequences, labels,
the KV cache and sampling are the same for every design; the designs differ in how such an id is
embedded and which head scores the codes:

* ``none``: the model only reads (no codes, no image head);
* ``shared`` (Chameleon, Emu3, Anole, Lumina-mGPT): the codes are rows appended to the LLM's own
  vocabulary, embedded by its embedding matrix and scored by its one LM head;
* ``masked`` (Show-o): the shared vocabulary and one more row, the ``[MASK]`` code; a drawn image
  is learnt by masking a cosine-scheduled share of its codes and predicting them all at once, with
  every position of the image seeing every other (``blocks``), and drawn by unmasking the most
  confident codes over a few parallel passes (``draw.unmask``);
* ``next_scale`` (VAR): the shared vocabulary over a multi-scale tokenizer's codes, coarse to fine;
  every code of a scale is predicted at once from the coarser scales' reconstruction, with
  block-causal attention across scales, and drawn in one pass per scale (``draw.by_scale``);
* ``diffusion`` (Transfusion): no codes; a drawn picture is its continuous pixel patches, learnt
  with a diffusion (flow-matching) loss beside the text's next-token loss and drawn by denoising
  all of it over a few passes (``draw.denoise``);
* ``decoupled`` (Janus): the LLM's vocabulary stays text; a code goes in through an embedding of
  its own and an aligner MLP, and a generation head (an MLP on the LLM's last hidden state) scores
  the next code. What the model reads goes through the encoder + connector, as before.

Where the next token is a code, only code logits exist (``code_logits``); elsewhere only text
logits (``text_logits``, the code columns of a shared head set to -inf): the two are masked apart,
never merely ignored in the loss, so sampling cannot leave an image early or write a code in text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .errors import ConfigError, SampleError
from .registry import Registry

if TYPE_CHECKING:  # the model (model.FusionLM) is passed in, never imported
    from torch.nn import Module as FusionLM

    from .config.schema import RecipeConfig

GENERATORS: Registry[type["Generator"]] = Registry("generation", "model.generation.kind")


class Generator:
    """One way for the LLM to draw (subclasses hold no state; their modules live on the model)."""

    name: ClassVar[str]
    draws: ClassVar[bool] = True

    def check(self, config: "RecipeConfig") -> None:
        """This design's rules for ``config``; a ``ConfigError`` names the key at fault."""
        if self.draws and config.model.image_tokenizer is None:
            raise ConfigError(f"model.image_tokenizer: the {self.name!r} generation draws in an image tokenizer's "
                              f"codes; set model.image_tokenizer (e.g. {{kind: vq}})")
        if self.draws and config.data.pack:
            raise ConfigError(f"data.pack: the {self.name!r} generation trains on unpacked rows; set data.pack: false")

    def build(self, model: "FusionLM", text_vocab: int) -> int:
        """Add this design's modules to ``model``; ``text_vocab``: rows of the LLM's vocabulary that are
        text. Returns the id of code 0."""
        return text_vocab

    def embed_codes(self, model: "FusionLM", embeds: torch.Tensor, input_ids: torch.Tensor,
                    pictures: "Noised | None" = None) -> torch.Tensor:
        """``embeds`` (B, T, D) with the positions of code ids embedded as codes (a diffusion design:
        the ``<image_code>`` positions as the patches of ``pictures``)."""
        return embeds

    def text_logits(self, model: "FusionLM", logits: torch.Tensor) -> torch.Tensor:
        """The LM head's logits (B, T, V) as text logits: no code can be chosen from them."""
        return logits

    def code_logits(self, model: "FusionLM", logits: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T, K) scores of the next code, from the LM head's ``logits`` or the last ``hidden`` state."""
        return None

    def code_head(self, model: "FusionLM"):
        """hidden (B, D), the LLM's last (normed) hidden state -> the next code's scores (B, K): what
        a decoder that runs the layers itself (``runtime.StaticDecoder``) puts in place of the LM head."""
        raise NotImplementedError

    needs_hidden: ClassVar[bool] = False  # code_logits reads the last hidden state
    noised: ClassVar[bool] = False  # writes pictures as noised continuous patches (diffusion), not codes
    # the sampler (of ``draw.PARALLEL``) of a design that writes many codes of an image a pass:
    # ``unmask`` (masked), ``by_scale`` (next-scale); None: one code a pass over a KV cache
    parallel: ClassVar[str | None] = None

    uses_steps: ClassVar[bool] = False  # its passes are ``model.generation.steps`` (masked, diffusion)

    @property
    def iterative(self) -> bool:
        """Draws a picture in passes over all of it, not code by code (so not inside a text answer)."""
        return self.parallel is not None

    def passes(self, model: "FusionLM", steps: int) -> int | None:
        """Decoder passes over the whole sequence that draw one picture at ``steps``; None: one
        cached pass per written position (``draw.passes``)."""
        return steps if self.uses_steps else None

    def mask_id(self, model: "FusionLM") -> int:
        """The id of the ``[MASK]`` code that a training sample and a sampler put in place of codes
        not yet known; -1: this design never masks codes."""
        return -1

    def blocks(self, model: "FusionLM", input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) attention blocks of ``input_ids`` (``packing.segment_mask``: positions of one nonzero
        number see each other both ways); None: causal everywhere."""
        return None


@GENERATORS.register("none")
class NoGeneration(Generator):
    name = "none"
    draws = False

    def check(self, config) -> None:
        pass


@GENERATORS.register("shared")
class Shared(Generator):
    """Codes as extra rows of the LLM's vocabulary, one LM head for text and codes."""

    name = "shared"
    extra_rows: ClassVar[int] = 0  # rows after the codes (masked: its [MASK] code)

    def build(self, model, text_vocab: int) -> int:
        size = text_vocab + model.image_tokenizer.codebook_size + self.extra_rows
        if model.llm.get_input_embeddings().weight.shape[0] < size:
            model.llm.resize_token_embeddings(size, mean_resizing=False)
        return text_vocab

    def text_logits(self, model, logits):
        return logits.index_fill(-1, model.code_ids(logits.device), float("-inf"))  # (B, T, V)

    def code_logits(self, model, logits, hidden):
        return logits[..., model.code_offset: model.code_offset + model.image_tokenizer.codebook_size]  # (B, T, K)

    def code_head(self, model):
        head = model.llm.get_output_embeddings()
        return lambda hidden: self.code_logits(model, head(hidden), None)


def code_runs(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) bool, True at drawn codes -> (B, T) each: the number of the run of codes a position is
    in or after (1, 2, … along the row), its offset in that run, and the openings (the position
    before a run, which scores its first code)."""
    starts = drawn & ~torch.cat([torch.zeros_like(drawn[:, :1]), drawn[:, :-1]], 1)  # (B, T): first code of a run
    number = starts.long().cumsum(1)  # (B, T)
    index = torch.arange(drawn.shape[1], device=drawn.device).expand_as(drawn)  # (B, T)
    offset = index - torch.where(starts, index, 0).cummax(1).values  # (B, T)
    before = torch.zeros_like(drawn)
    before[:, :-1] = starts[:, 1:]
    return number, offset, before & ~drawn


def image_blocks(drawn: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at drawn codes -> (B, T) block numbers: each run of codes and the position
    before it (the one that scores its first code), 1, 2, … along the row; 0 elsewhere."""
    number, _, opening = code_runs(drawn)
    return torch.where(opening, number + 1, number * drawn)  # the opening takes the number its run is about to get


@GENERATORS.register("masked")
class Masked(Shared):
    """Show-o's discrete masked generation: the shared vocabulary plus a ``[MASK]`` code (id
    ``code_offset + K``). In training, each drawn image has a cosine-scheduled share of its codes
    replaced by ``[MASK]`` and only those are targets (``DrawLayout.masked``, decided per sample);
    the image's positions (the one before its first code, which scores it, and its codes) attend
    to each other both ways, text stays causal.
    Scores follow the model's one convention: position t-1 scores position t's code; inside an
    image every position sees every other, so both see the same tokens."""

    name = "masked"
    parallel = "unmask"
    uses_steps = True
    extra_rows = 1  # [MASK]

    def check(self, config) -> None:
        super().check(config)
        codes_alone(self.name, config, steps=self.uses_steps)

    def mask_id(self, model) -> int:
        return model.code_offset + model.image_tokenizer.codebook_size

    def text_logits(self, model, logits):
        return super().text_logits(model, logits).index_fill(-1, torch.tensor([self.mask_id(model)], device=logits.device),
                                                             float("-inf"))  # (B, T, V)

    def blocks(self, model, input_ids):
        slots = (input_ids >= model.code_offset) & (input_ids <= self.mask_id(model))  # (B, T): codes and [MASK]
        slots |= input_ids == model.ids.code  # and slots whose codes are not filled in yet
        return image_blocks(slots) if bool(slots.any()) else None


def codes_alone(name: str, config: "RecipeConfig", *, tokenizer: str | None = None, needs: str = "",
                steps: bool = False) -> None:
    """The rules of a design that draws a picture in passes over all of its codes: ``tokenizer``,
    the image tokenizer kind it ``needs`` (what for); ``steps``: its passes are
    ``model.generation.steps``."""
    gen = config.model.generation
    kind = config.model.image_tokenizer.kind
    if tokenizer is not None and kind != tokenizer:
        raise ConfigError(f"model.image_tokenizer.kind: the {name!r} generation {needs}; set kind: {tokenizer} "
                          f"(got {kind!r})")
    if steps and gen.steps < 1:
        raise ConfigError(f"model.generation.steps: {gen.steps}; the {name!r} generation needs at least one pass")
    if gen.row_end_token or gen.size_header or gen.header_token or gen.frame_end_token:
        raise ConfigError(f"model.generation: the {name!r} generation writes an image's codes alone "
                          "(no row_end_token, size_header, header_token or frame_end_token)")
    if config.model.fusion.kind == "early":
        raise ConfigError(f"model.fusion.kind: the {name!r} generation reads pictures through a tower (a fusion "
                          "other than 'early'); pictures read as codes would need their blocks attended both "
                          "ways while decoding text too, which is not built")


@GENERATORS.register("next_scale")
class NextScale(Shared):
    """VAR's next-scale prediction through the LLM: the multi-scale tokenizer's codes (coarse to
    fine, ``image_tokenizers.MultiScaleTokenizer``) are rows of the shared vocabulary, scored by the
    LM head, and every code of a scale is predicted at once.

    The model's one convention holds (position t-1 scores the code at t), so the position before a
    scale's first code and those of its other codes but the last predict that scale. What they read
    is VAR's teacher-forced input, not their own code: ``f_hat`` of the coarser scales at this
    scale's side (``scale_inputs``), through a linear map to the LLM's width plus a learnt embedding
    of the scale (``gen_in``, ``gen_level``); the opening predicts the first scale. Attention is
    block-causal: the positions predicting one scale see each other and every earlier scale, never
    a later one (``blocks``); text stays causal. Drawn in one pass per scale (``draw.by_scale``)."""

    name = "next_scale"
    parallel = "by_scale"

    def check(self, config) -> None:
        super().check(config)
        codes_alone(self.name, config, tokenizer="multiscale", needs="predicts a multi-scale tokenizer's scales")

    def passes(self, model, steps):
        return len(model.image_tokenizer.scales)

    def build(self, model, text_vocab: int) -> int:
        offset = super().build(model, text_vocab)
        width, tok = model.llm.config.hidden_size, model.image_tokenizer
        model.gen_in = nn.Linear(tok.config.code_dim, width)
        model.gen_level = nn.Embedding(len(tok.scales), width)
        return offset

    def _slots(self, model, input_ids):
        codes = (input_ids >= model.code_offset) & (input_ids < model.code_offset + model.image_tokenizer.codebook_size)
        return codes | (input_ids == model.ids.code)  # (B, T): and slots whose codes are not filled in yet

    def _predicts(self, model, device) -> torch.Tensor:
        """(n,) the scale that each position of a picture's codes predicts (the next code's), -1 at
        the last code (it predicts the end of the image)."""
        tok = model.image_tokenizer
        level = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(tok.spans())])  # (n,)
        return torch.cat([level[1:], level.new_full((1,), -1)]).to(device)

    def _runs(self, model, input_ids):
        slots = self._slots(model, input_ids)
        number, offset, opening = code_runs(slots)
        n = model.image_tokenizer.grid[1]
        if bool(slots.any()) and (bool((offset[slots] >= n).any()) or int((slots & (offset == n - 1)).sum()) * n != int(slots.sum())):
            raise SampleError(f"a drawn picture of the 'next_scale' generation is a run of {n} codes; the batch has "
                              f"runs of other lengths")
        return slots, number, offset, opening

    def embed_codes(self, model, embeds, input_ids, pictures=None):
        slots, _, offset, _ = self._runs(model, input_ids)
        if not bool(slots.any()):
            return embeds
        tok, n = model.image_tokenizer, model.image_tokenizer.grid[1]
        codes = (input_ids[slots] - model.code_offset).clamp(min=0).view(-1, n)  # (G, n): a slot not yet drawn reads as code 0
        level = self._predicts(model, input_ids.device)[:-1]  # (n-1,)
        x = model.gen_in(tok.scale_inputs(codes).to(embeds.dtype)) + model.gen_level(level)  # (G, n-1, D)
        out = embeds.clone()
        out[slots & (offset < n - 1)] = x.flatten(0, 1).to(embeds.dtype)
        return out

    def blocks(self, model, input_ids):
        slots, number, offset, opening = self._runs(model, input_ids)
        if not bool(slots.any()):
            return None
        scales = len(model.image_tokenizer.scales)
        n = model.image_tokenizer.grid[1]
        level = self._predicts(model, input_ids.device)[offset.clamp(max=n - 1)]  # (B, T)
        inside = torch.where(slots & (level >= 0), (number - 1) * scales + level + 1, 0)  # (B, T)
        return torch.where(opening, number * scales + 1, inside)  # the opening predicts the first scale


@dataclass
class Noised:
    """Pictures of a diffusion design as the LLM reads them: the patches at noise level ``times``
    (flow matching: ``x_t = (1 - t) x_0 + t eps``) and, in training, the velocity ``eps - x_0`` to
    predict."""

    patches: torch.Tensor  # (G, n, C)
    times: torch.Tensor  # (G,) in [0, 1]: 1 is pure noise
    target: torch.Tensor | None = None  # (G, n, C)


def time_features(t: torch.Tensor, width: int) -> torch.Tensor:
    """(G,) noise levels in [0, 1] -> (G, width) sinusoidal features (of 1000 t, as a DDPM timestep)."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
    angles = 1000 * t.float()[:, None] * freqs[None]  # (G, half)
    return torch.cat([angles.cos(), angles.sin()], -1)  # (G, width)


@GENERATORS.register("diffusion")
class Diffusion(Generator):
    """Transfusion: a drawn picture is its raw pixel patches (``image_tokenizers.PatchTokenizer``),
    continuous, with ``<begin_of_image>`` / ``<end_of_image>`` around them; text keeps its
    next-token loss, and each picture adds a diffusion loss (flow matching: the MSE of the
    predicted velocity, weighted by the stage's ``loss_weights.image``, Transfusion's lambda). A
    patch goes in through a linear map plus embeddings of the noise level and of its place in the
    grid (``gen_in``, ``gen_time``, ``gen_pos``) and comes out through ``gen_out`` at its own position
    (not the next one). The picture's positions attend to each other both ways (``blocks``, as the
    masked design's); text stays causal. Noise and noise level are drawn per sample from its own
    seed (``DrawLayout.noised``), so a sample is noised alike on any number of processes and after
    a resume. Drawn by ``draw.denoise`` in ``model.generation.steps`` Euler steps of the flow."""

    name = "diffusion"
    parallel = "denoise"
    uses_steps = True
    needs_hidden = True
    noised = True

    def check(self, config) -> None:
        super().check(config)
        codes_alone(self.name, config, tokenizer="patches", needs="writes pictures as continuous patches",
                    steps=self.uses_steps)

    def build(self, model, text_vocab: int) -> int:
        width, tok = model.llm.config.hidden_size, model.image_tokenizer
        model.gen_in = nn.Linear(tok.config.code_dim, width)
        model.gen_time = Head(width, width, width)
        model.gen_pos = nn.Embedding(math.prod(tok.grid), width)
        model.gen_out = Head(width, width, tok.config.code_dim)
        return text_vocab

    def noise(self, model, drawn: torch.Tensor, noise: torch.Tensor | None, times: torch.Tensor | None) -> Noised:
        """Training pictures ``drawn`` (G, 3, S, S) noised by ``noise`` (G, 3, S, S) to ``times`` (G,)."""
        if noise is None or times is None or len(noise) != len(drawn) or len(times) != len(drawn):
            raise SampleError(f"the 'diffusion' generation needs each drawn picture's noise and noise level "
                              f"(Batch.noise, Batch.times, made per sample); got {len(drawn)} pictures and "
                              f"{'no' if noise is None else len(noise)} noises")
        tok = model.image_tokenizer
        x0, eps = tok.encode(drawn).flatten(1, 2), tok.encode(noise.to(drawn.dtype)).flatten(1, 2)  # (G, n, C)
        t = times.to(drawn.dtype)[:, None, None]  # (G, 1, 1)
        return Noised((1 - t) * x0 + t * eps, times, eps - x0)

    def embed_codes(self, model, embeds, input_ids, pictures=None):
        slots = input_ids == model.ids.code  # (B, T)
        if not bool(slots.any()):
            return embeds
        if pictures is None or int(slots.sum()) != pictures.patches.shape[0] * pictures.patches.shape[1]:
            raise SampleError(f"the batch has {int(slots.sum())} picture positions and "
                              f"{0 if pictures is None else pictures.patches.shape[:2].numel()} patches to put there")
        width = embeds.shape[-1]
        x = (model.gen_in(pictures.patches.to(embeds.dtype))
             + model.gen_time(time_features(pictures.times, width).to(embeds.dtype))[:, None]
             + model.gen_pos.weight[None])  # (G, n, D)
        out = embeds.clone()
        out[slots] = x.flatten(0, 1).to(embeds.dtype)
        return out

    def velocity(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) at picture positions -> (..., C) the predicted velocity of their patches."""
        return model.gen_out(hidden)

    def blocks(self, model, input_ids):
        slots = input_ids == model.ids.code  # (B, T)
        return image_blocks(slots) if bool(slots.any()) else None


class Head(nn.Module):
    """Janus's aligner and generation head: Linear -> GELU -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@GENERATORS.register("decoupled")
class Decoupled(Generator):
    """A code embedding + aligner in, a generation head out; the LLM's vocabulary stays text."""

    name = "decoupled"
    needs_hidden = True

    def build(self, model, text_vocab: int) -> int:
        width = model.llm.config.hidden_size
        hidden = model.config.generation.head_hidden or width
        tok = model.image_tokenizer
        code_dim = getattr(tok.config, "code_dim", width)
        model.gen_embed = nn.Embedding(tok.codebook_size, code_dim)
        model.gen_aligner = Head(code_dim, hidden, width)
        model.gen_head = Head(width, hidden, tok.codebook_size)
        return text_vocab

    def embed_codes(self, model, embeds, input_ids, pictures=None):
        codes = input_ids - model.code_offset  # (B, T)
        is_code = codes >= 0
        if not bool(is_code.any()):
            return embeds
        aligned = model.gen_aligner(model.gen_embed(codes.clamp(min=0)))  # (B, T, D)
        return torch.where(is_code[..., None], aligned.to(embeds.dtype), embeds)

    def code_logits(self, model, logits, hidden):
        return model.gen_head(hidden)  # (B, T, K)

    def code_head(self, model):
        return model.gen_head


def generator_of(kind: str) -> Generator:
    """The design that ``model.generation.kind`` names (a ``ConfigError`` listing the known ones if none)."""
    return GENERATORS.get(kind)()
