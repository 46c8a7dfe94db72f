"""Answers in text and pictures (any-to-any output): a model that draws may open a picture in the
middle of a text answer, draw it, and go on writing.

Each row decodes text until it writes ``<begin_of_image>``; the rest of the picture follows as
training writes it (``DrawLayout.tokens``): its codes, chosen from code scores only, and any tokens
around them (Emu3's header, row ends and end of frame) written, not sampled, then
``<end_of_image>``, and the row is back in text. Text is chosen from text logits,
which cannot write a code (``generators``). Rows of one batch may be in different modes at the
same step.

With guidance (``cfg`` != 1) each request has a null row (``data.drawing.null_prompt``, as in
``draw``) that is given every token its request's row writes, text included, so a picture opened
after some text is guided by the same conversation without its prompt. A picture is drawn with the
request's own generator (its ``seed``), as ``draw`` draws: a picture opened first is the picture
``draw`` draws for the same request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from .data.drawing import DrawLayout
from .data.pixels.processing import ImageSpec
from .device import model_device
from .draw import Sampling, _rows, pick
from .errors import ConfigError, SampleError
from .generate import MAX_NEW_TOKENS, GeneralDecoder, Request, left_pad, never_written, next_tokens, stop_ids
from .image_tokenizers import images_of
from .model import FusionLM
from .runtime import StaticDecoder, unsupported


@dataclass
class Answer:
    """One request's answer: text pieces and pictures, in the order they were written."""

    parts: list[str | Image.Image] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The text pieces, each picture shown as ``<image>``."""
        return "".join(p if isinstance(p, str) else "<image>" for p in self.parts).strip()

    @property
    def pictures(self) -> list[Image.Image]:
        return [p for p in self.parts if not isinstance(p, str)]


@dataclass
class AnswerRequest(Request):
    """A ``Request`` and the seed its pictures are drawn with."""

    seed: int = 0


class _Row:
    """Where one conversational row is: its text ids so far, or which position of a picture."""

    def __init__(self):
        self.pieces: list[list[int] | torch.Tensor] = [[]]  # text ids, then each picture's codes (K,), …
        self.at = -1  # -1: in text; else the next position of the open picture, an index of ``places``
        self.places: list[int] = []  # the open picture's ids after <begin_of_image>, <image_code> for each code
        self.codes: list[int] = []
        self.pictures = 0
        self.done = False

    def wants_code(self, layout) -> bool:
        """Whether this row's next position is a code (not text, a header, an end of row, the
        picture's footer or its end)."""
        return self.at >= 0 and self.places[self.at] == layout.code

    def next(self, text: int, code: int | None, layout, offset: int, end: set[int], pad: int) -> int:
        """The token this row writes next (``text``, the text choice; ``code``, the code choice when
        ``wants_code``), its state moved on."""
        if self.done:
            return pad
        if self.at < 0:  # in text
            if text in end:
                self.done = True
                return pad
            if layout is not None and text == layout.begin:
                self.at, self.codes, self.places = 0, [], layout.tokens()[1:]
            else:
                self.pieces[-1].append(text)
            return text
        place = self.places[self.at]  # after <begin_of_image>: a code slot or a token written as it is
        self.at += 1
        if place == layout.code:
            self.codes.append(code)
            return code + offset
        if place == layout.end:  # the picture is complete: close it
            self.pieces += [torch.tensor(self.codes), []]
            self.at, self.pictures = -1, self.pictures + 1
        return place  # Emu3: a header, a row's end or the footer


@torch.no_grad()
def answer(model: FusionLM, tokenizer, requests: list[AnswerRequest], spec: ImageSpec | None = None, *,
           max_new_tokens: int = MAX_NEW_TOKENS, max_pictures: int = 1, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, sampling: Sampling | None = None, static: bool = True) -> list[Answer]:
    """Each request answered in text and up to ``max_pictures`` pictures.

    ``max_new_tokens`` bounds the text tokens; a picture's positions come on top. Text is chosen
    at ``temperature`` / ``top_p`` (0: greedy) with one generator of ``seed``; pictures with
    ``sampling`` (default: the model's ``model.generation`` settings) and each request's ``seed``.
    A model that does not draw answers in text alone.
    """
    sampling = sampling or Sampling.of(model.config.generation)
    sampling.check()
    if max_pictures < 0 or max_new_tokens < 1:
        raise ConfigError(f"answer: max_pictures must be >= 0 and max_new_tokens >= 1, got {max_pictures}, "
                          f"{max_new_tokens}")
    if max_pictures > 0 and model.generation.iterative:
        raise ConfigError(f"answer: the {model.generation.name!r} generation draws a picture in parallel passes, "
                          "which an answer in text and pictures does not do yet; draw it on its own "
                          "(fusionlm generate --image-out, or max_pictures=0 for text alone)")
    layout = DrawLayout.of(model)
    max_pictures = max_pictures if layout is not None else 0
    guided = max_pictures > 0 and sampling.cfg != 1.0
    rows, pixels = _rows(model, tokenizer, spec, requests, guided, opened=False)
    written = 0 if layout is None else len(layout.tokens())  # a whole picture: its opening to its end
    budget = max_new_tokens + max_pictures * written  # new positions at most
    longest = max(len(r) for r in rows)
    if longest + budget > model.config.llm.max_length:
        raise SampleError(f"a prompt of {longest} tokens, {max_new_tokens} new tokens and {max_pictures} picture(s) "
                          f"of {written} positions do not fit the context of {model.config.llm.max_length}")
    device = model_device(model)
    ids, mask = (t.to(device) for t in left_pad(rows, tokenizer.pad_token_id))  # (R, T)
    context = model.encode_images(pixels.to(device), ids) if pixels is not None else None
    steps = _Steps(model, len(ids), longest + budget, static)
    b = len(requests)
    text_generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    code_generators = [torch.Generator(device).manual_seed(r.seed) for r in requests]
    end, pad = set(stop_ids(model)), tokenizer.pad_token_id
    state = [_Row() for _ in requests]
    text, codes = steps.prefill(ids, mask, context)  # (R, V), (R, K) or None
    never = torch.zeros(text.shape[-1], dtype=torch.bool, device=device)  # (V,) what text never writes
    never[[i for i in never_written(model, opening=True) if i < text.shape[-1]]] = True
    for _ in range(budget):
        banned = never.expand(b, -1).clone()  # (B, V)
        if layout is not None:  # a row that has drawn its pictures opens no more
            banned[[i for i, r in enumerate(state) if r.pictures >= max_pictures], model.ids.begin_image] = True
        chosen_text = next_tokens(text[:b].masked_fill(banned, float("-inf")), temperature, top_p, text_generator)
        drawing = [i for i, r in enumerate(state) if r.wants_code(layout)]  # only they use their generators
        chosen_code = {}
        if drawing:
            at = torch.tensor(drawing, device=device)
            scores = codes[b:][at] + sampling.cfg * (codes[:b][at] - codes[b:][at]) if guided else codes[at]  # (n, K)
            picked = pick(scores, sampling, [code_generators[i] for i in drawing])  # (n,)
            chosen_code = dict(zip(drawing, picked.tolist()))
        tokens = [r.next(int(chosen_text[i]), chosen_code.get(i), layout, model.code_offset, end, pad)
                  for i, r in enumerate(state)]
        if all(r.done for r in state):
            break
        token = torch.tensor(tokens, device=device)
        text, codes = steps.step(token.repeat(2 if guided else 1))
    return [_answer(model, tokenizer, r) for r in state]


def _answer(model, tokenizer, row: _Row) -> Answer:
    out = Answer()
    for piece in row.pieces:
        if isinstance(piece, torch.Tensor):
            grid = model.image_tokenizer.grid
            out.parts.extend(images_of(model.image_tokenizer.decode(piece.view(1, *grid).to(model_device(model)))))
        elif piece:
            out.parts.append(tokenizer.decode(piece, skip_special_tokens=True))
    return out


class _Steps:
    """A decoder that gives both heads' scores at every step: text logits (R, V) and, for a model
    that draws, code scores (R, K)."""

    def __init__(self, model: FusionLM, rows: int, length: int, static: bool):
        self.model = model
        if static and unsupported(model, length) is None:
            self.decoder = StaticDecoder(model, rows, length)
            self.decoder.head = lambda hidden: hidden  # (R, D): both heads are applied below
        else:
            self.decoder = GeneralDecoder(model, True, scores="both")

    def _heads(self, out):
        """The static decoder's last (normed) hidden state (R, D) -> both scores, from one LM head
        pass (a shared vocabulary's code scores are its code columns), as ``FusionLM.forward``."""
        model = self.model
        if isinstance(self.decoder, GeneralDecoder):
            return out
        logits = model.llm.get_output_embeddings()(out)  # (R, V)
        codes = model.generation.code_logits(model, logits, out) if model.draws else None  # (R, K)
        return model.generation.text_logits(model, logits), codes

    def prefill(self, ids, mask, context):
        return self._heads(self.decoder.prefill(ids, mask, context))

    def step(self, tokens):
        return self._heads(self.decoder.step(tokens))
