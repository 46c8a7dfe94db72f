"""An lmms-eval model adapter: evaluate a fusionlm checkpoint on lmms-eval's benchmarks.

lmms-eval (``pip install 'fusionlm[lmms]'``, version 0.7.3) runs the field's benchmarks (MMMU,
MMBench, ChartQA, DocVQA, …) against any model class it can find by name. This module gives it
one, named ``fusionlm``::

    python -m fusionlm.evaluate.lmms --model fusionlm \\
        --model_args pretrained=runs/x,device=auto,batch_size=8 --tasks chartqa --output_path results/

(the same arguments as ``lmms-eval``; this entry point only registers the model first). From
Python, ``simple_evaluate(model=FusionLMEval(pretrained="runs/x"), tasks=["chartqa"])`` works too.

What the adapter does with each kind of lmms-eval request:

* ``generate_until`` (context, gen_kwargs, doc_to_visual, doc_id, task, split): the context and
  the document's visuals become one fusionlm ``Request`` (``to_request``), answered by fusionlm's
  own ``generate`` with the request's ``max_new_tokens`` / ``temperature`` / ``top_p`` (greedy
  unless ``do_sample`` or a positive temperature asks otherwise); the decoded answer is cut at the
  first of the ``until`` stop strings. Requests with the same settings are batched.
* ``loglikelihood`` (context, continuation, doc_to_visual, doc_id, task, split): the prompt is
  encoded exactly as ``generate`` encodes it (chat template, generation prompt, image layouts),
  the continuation's tokens follow it, and one forward pass gives the sum of their log-probs and
  whether greedy decoding would have produced them (``continuation_score``).
* ``generate_until_multi_round``: round 0 answers the context; each later round asks the task's
  ``doc_to_text(doc, previous_output=…, round_idx=…, previous_round_info=…)`` for the next
  visuals and context until it signals the end; the result is the list of the rounds' answers.

Images: lmms-eval's ``<image>`` placeholder is fusionlm's. When the context has exactly one
placeholder per visual they stay where the task put them (interleaved); otherwise the
placeholders are dropped and the images go first, as fusionlm trains (``image_placement=first``
always does that). PIL images and image paths are images; a folder or a video file path is a
``Video`` (fusionlm decodes frame folders and animated images, not ``.mp4`` files).

A request fusionlm refuses (a prompt longer than the context, an unreadable image, an audio
input) is answered with ``""`` (log-likelihood ``-inf``) and a warning naming it, so one bad
document does not end a long run; ``strict=True`` raises instead.

Nothing here needs lmms-eval except ``FusionLMEval`` (built on first use) and ``register``: the
conversion, generation and scoring are plain functions and a plain ``FusionLMAdapter`` class.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..data.chat import PLACEHOLDERS
from ..data.prompt import PromptEncoder
from ..data.processing import ImageBatch, ImageSpec
from ..data.video import VIDEO_FILE_SUFFIXES, Video, placeholder
from ..device import model_device
from ..errors import FusionError, SampleError
from ..generate import MAX_NEW_TOKENS, Request, generate

MODEL_NAME = "fusionlm"
MODULE = "fusionlm.evaluate.lmms"  # also when run as ``python -m``, where __name__ is __main__
CLASS_PATH = f"{MODULE}.FusionLMEval"
LMMS_EVAL_VERSION = "0.7.3"

log = logging.getLogger("fusionlm.lmms")


# ---------------------------------------------------------------- requests -> fusionlm Requests


def to_items(visuals: Any) -> list[Any]:
    """lmms-eval visuals (None, one visual, or a possibly nested list) -> fusionlm image items.

    PIL images and image paths stay as they are; a folder, or a path with a video suffix, becomes
    a ``Video``. Audio (lmms-eval passes it as a dict) is refused with a ``SampleError``.
    """
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    items: list[Any] = []
    for v in visuals:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            items.extend(to_items(v))
        elif isinstance(v, Video):
            items.append(v)
        elif isinstance(v, (str, os.PathLike)):
            path = Path(v)
            items.append(Video(v) if path.is_dir() or path.suffix.lower() in VIDEO_FILE_SUFFIXES else v)
        elif isinstance(v, dict):
            raise SampleError(f"an audio input ({', '.join(sorted(v))}): fusionlm models take images and video only")
        elif hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image
            items.append(v)
        else:
            raise SampleError(f"a visual of type {type(v).__name__}: expected a PIL image, an image path or a video")
    return items


def to_request(context: str, visuals: Any, *, id: str = "request", image_placement: str = "auto") -> Request:
    """One fusionlm ``Request`` for an lmms-eval context and its visuals.

    ``image_placement="auto"``: when the context's ``<image>`` / ``<video>`` placeholders match the
    items one for one (in order and kind), they stay where they are; otherwise (and always with
    ``"first"``) they are removed and every item goes before the text, one placeholder a line.
    """
    if image_placement not in ("auto", "first"):
        raise ValueError(f"image_placement: {image_placement!r} (expected 'auto' or 'first')")
    items = to_items(visuals)
    context = context or ""
    found = PLACEHOLDERS.findall(context)
    if image_placement == "auto" and found == [placeholder(item) for item in items]:
        return Request(context, items, id=id)
    if found:
        context = PLACEHOLDERS.sub("", context).strip()
    prompt = "".join(f"{placeholder(item)}\n" for item in items) + context
    return Request(prompt, items, id=id)


# ---------------------------------------------------------------- generation settings and stops


@dataclass(frozen=True)
class GenSettings:
    """What ``generate`` is called with for a request (hashable: requests are batched by it)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    def kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}


def generation_settings(gen_kwargs: dict | None, *,
                        default_max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[GenSettings, list[str]]:
    """lmms-eval gen_kwargs -> (settings, stop strings).

    Greedy unless ``do_sample`` is true or, with no ``do_sample``, ``temperature`` is positive
    (``do_sample`` with no temperature samples at 1.0). ``top_p: None`` means 1. ``until``: a
    string or a list of strings. Other keys (``num_beams``, ``image_aspect_ratio``…) are ignored.
    """
    kw = dict(gen_kwargs or {})
    until = kw.get("until")
    stops = [until] if isinstance(until, str) else [s for s in (until or []) if isinstance(s, str)]
    max_new = int(kw.get("max_new_tokens") or default_max_new_tokens)
    temperature = float(kw.get("temperature") or 0.0)
    do_sample = kw.get("do_sample")
    if do_sample is not None and not do_sample:
        temperature = 0.0
    elif do_sample and temperature <= 0:
        temperature = 1.0
    top_p = kw.get("top_p")
    top_p = 1.0 if top_p is None or temperature <= 0 else float(top_p)
    if int(kw.get("num_beams") or 1) > 1:
        log.warning("num_beams=%s: fusionlm decodes without beam search (greedy or sampled)", kw["num_beams"])
    return GenSettings(max_new, temperature, top_p), [s for s in stops if s]


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (empty strings are ignored)."""
    end = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if 0 <= at < end:
                end = at
    return text[:end]


# ---------------------------------------------------------------- log-likelihoods


def encode_prompt(model, tokenizer, spec: ImageSpec, request: Request) -> tuple[list[int], list]:
    """The prompt's token ids (image layouts expanded, generation prompt added) and its encoder
    inputs: exactly what ``generate`` feeds the model for ``request``."""
    prompted = PromptEncoder.of(model, tokenizer, spec).request(request)
    return prompted.encoded.input_ids, prompted.inputs


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
        prompt, pixels = encode_prompt(model, tokenizer, spec, request)
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else []
        ids = prompt + cont
        if len(ids) > model.config.llm.max_length:
            raise SampleError(f"request {request.id}: prompt and continuation take {len(ids)} tokens, over the "
                              f"context of {model.config.llm.max_length}")
        if not prompt:
            raise SampleError(f"request {request.id}: the prompt encodes to no token")
        rows.append((ids, len(prompt), pixels))
    device = model_device(model)
    never = torch.tensor(sorted({model.ids.image, model.ids.newline}))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start:start + max(1, batch_size)]
        width = max(len(rows[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        pixels = []
        for b, i in enumerate(chunk):
            row = rows[i][0]
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
            pixels.extend(rows[i][2])
        batch = ImageBatch.collate(pixels)
        result = model(ids.to(device), attention_mask=mask.to(device),
                       pixel_values=batch.to(device) if batch is not None else None)
        for b, i in enumerate(chunk):
            row, n_prompt, _ = rows[i]
            targets = torch.tensor(row[n_prompt:], device=device)
            out[i] = continuation_score(result.logits[b, n_prompt - 1:len(row) - 1], targets, never)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- the adapter


@contextlib.contextmanager
def strict_image_loading():
    """Pillow's ``LOAD_TRUNCATED_IMAGES`` off for the duration, then back as it was.

    lmms-eval turns it on for the whole process when its task module is imported (so that its
    datasets' truncated images load padded); fusionlm's image loader refuses to run with it on
    (a truncated file would give different pixels in different processes). The adapter runs
    fusionlm's image processing inside this, and the tasks' ``doc_to_visual`` outside it: a
    visual that is still undecoded and truncated is then refused like any unreadable image.
    """
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _batch_size(value: Any, max_batch_size: Any = None) -> int:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        size = int(max_batch_size or 1)
        log.warning("batch_size=%s: fusionlm does not probe for a batch size; using %d", value, size)
        return size
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size: {value!r} (expected a positive integer)")
    return size


class FusionLMAdapter:
    """The lmms-eval model protocol over a fusionlm checkpoint, without lmms-eval itself.

    Args (lmms-eval's ``--model_args``, e.g. ``pretrained=runs/x,device=cpu,batch_size=8``):
        pretrained: a checkpoint directory or a run directory (its latest checkpoint).
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        batch_size: requests per forward pass / decoding batch.
        max_new_tokens: used when a task's gen_kwargs set none (default ``generate.MAX_NEW_TOKENS``,
            the same as ``fusionlm generate`` and ``fusionlm eval``).
        image_placement: ``auto`` (keep the context's ``<image>`` placeholders when they match the
            visuals, else images first) or ``first`` (always images first).
        strict: raise on a request fusionlm refuses instead of answering ``""`` / ``-inf``.
        seed: the sampling seed (only for tasks that sample).
        model, tokenizer, config: an already loaded model instead of ``pretrained`` (Python use).
    """

    is_simple = True  # lmms-eval: takes doc_to_text contexts, not doc_to_messages
    MAX_ROUNDS = 1000  # generate_until_multi_round: a task that never says it is done

    def __init__(self, pretrained: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int = MAX_NEW_TOKENS, image_placement: str = "auto",
                 strict: bool = False, seed: int = 0, max_batch_size: int | None = None, *,
                 model=None, tokenizer=None, config=None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"fusionlm: unknown model argument(s) {', '.join(sorted(unknown))} (known: pretrained, "
                            f"device, batch_size, max_new_tokens, image_placement, strict, seed)")
        if image_placement not in ("auto", "first"):
            raise ValueError(f"image_placement: {image_placement!r} (expected 'auto' or 'first')")
        if model is None:
            if pretrained is None:
                raise TypeError("fusionlm: pretrained=PATH (a checkpoint or run directory) is required")
            from ..checkpoint import load_model

            model, tokenizer, config = load_model(str(pretrained), device=str(device or "auto"))
        elif tokenizer is None or config is None:
            raise TypeError("fusionlm: a model needs its tokenizer and config too")
        self._model, self._tokenizer, self._config = model.eval(), tokenizer, config
        self.spec = ImageSpec.for_model(model, config)
        self.batch_size_per_device = _batch_size(batch_size, max_batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.image_placement = image_placement
        self.strict = bool(strict)
        self.seed = int(seed)
        self.failures: list[str] = []  # ids of the requests answered "" / -inf instead of raising
        self._rank, self._world_size = 0, 1
        self.task_dict: dict = {}  # lmms-eval fills it: task -> split -> docs

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's constructor: ``key=value,…`` model args, then the CLI's ``batch_size`` /
        ``max_batch_size`` / ``device``. A key given in both is taken from the model args (lmms-eval's
        own version would fail with 'got multiple values', since the CLI always sends batch_size)."""
        args = _parse_args(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **args})

    # lmms-eval reads these
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._config

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return model_device(self._model)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ------------------------------------------------------------ helpers

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: Any) -> Any:
        return doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None

    def _refuse(self, rid: str, exc: Exception) -> None:
        if self.strict:
            raise exc
        self.failures.append(rid)
        log.warning("fusionlm: request %s refused (%s); it counts as answered wrong", rid, exc)

    def _generate(self, requests: list[Request | Exception], ids: list[str], settings: GenSettings) -> list[str]:
        """Answers, in order; a batch with a refused request is retried one by one."""
        good = [r for r in requests if isinstance(r, Request)]
        if len(good) == len(requests):
            try:
                with strict_image_loading():
                    return generate(self._model, self._tokenizer, good, self.spec, seed=self.seed, **settings.kwargs())
            except FusionError as exc:
                if len(requests) == 1:
                    self._refuse(ids[0], exc)
                    return [""]
        out = []
        for request, rid in zip(requests, ids):
            if isinstance(request, Exception):
                self._refuse(rid, request)
                out.append("")
            else:
                out.extend(self._generate([request], [rid], settings))
        return out

    def _request(self, context: str, visuals_of: Callable[[], Any], rid: str) -> Request | Exception:
        try:
            return to_request(context, visuals_of(), id=rid, image_placement=self.image_placement)
        except FusionError as exc:
            return exc

    # ------------------------------------------------------------ the lmms-eval protocol

    def generate_until(self, requests) -> list[str]:
        """One answer per request (``req.args``: context, gen_kwargs, doc_to_visual, doc_id, task,
        split), in order; requests with the same settings are decoded together, longest first."""
        plans = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            settings, stops = generation_settings(gen_kwargs, default_max_new_tokens=self.max_new_tokens)
            plans.append((i, context, settings, stops, doc_to_visual, doc_id, task, split))
        groups: dict[GenSettings, list] = {}
        for plan in sorted(plans, key=lambda p: -len(p[1] or "")):
            groups.setdefault(plan[2], []).append(plan)
        out: list[str | None] = [None] * len(requests)
        pbar = _progress(len(requests), self.rank != 0)
        for settings, group in groups.items():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                ids = [f"{p[6]}/{p[7]}/{p[5]}" for p in chunk]
                reqs = [self._request(p[1], lambda p=p: self._visuals(p[4], p[6], p[7], p[5]), rid)
                        for p, rid in zip(chunk, ids)]
                for p, text in zip(chunk, self._generate(reqs, ids, settings)):
                    out[p[0]] = cut_at_stops(text, p[3])
                pbar.update(len(chunk))
        pbar.close()
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), greedy) per request (``req.args``: context, continuation
        — a string, or lmms-eval's doc_to_target — doc_to_visual, doc_id, task, split; or just
        context and continuation, for lmms-eval's unconditional requests)."""
        pairs: list[tuple[Request | Exception, str, str]] = []
        for i, req in enumerate(requests):
            args = req.args
            if len(args) == 2:
                context, target = args
                rid = f"loglikelihood/{i}"
                request = self._request(context, lambda: None, rid)
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                rid = f"{task}/{split}/{doc_id}"
                visuals_of = functools.partial(self._visuals, doc_to_visual, task, split, doc_id)
                request = self._request(context, visuals_of, rid)
                if callable(target):
                    target = target(self._doc(task, split, doc_id))
            pairs.append((request, "" if target is None else str(target), rid))
        out: list[tuple[float, bool]] = []
        pbar = _progress(len(requests), self.rank != 0)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            out.extend(self._score(chunk))
            pbar.update(len(chunk))
        pbar.close()
        return out

    def _score(self, chunk) -> list[tuple[float, bool]]:
        if all(isinstance(r, Request) for r, _, _ in chunk):
            try:
                with strict_image_loading():
                    return loglikelihoods(self._model, self._tokenizer, self.spec, [(r, c) for r, c, _ in chunk],
                                          batch_size=len(chunk))
            except FusionError as exc:
                if len(chunk) == 1:
                    self._refuse(chunk[0][2], exc)
                    return [(float("-inf"), False)]
        out = []
        for item in chunk:
            if isinstance(item[0], Exception):
                self._refuse(item[2], item[0])
                out.append((float("-inf"), False))
            else:
                out.extend(self._score([item]))
        return out

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """The answers of every round, per request (``req.args``: context, gen_kwargs,
        doc_to_visual, doc_to_text, doc_id, task, split). Round 0 answers the context with the
        document's visuals; round k >= 1 takes ``(visuals, context, done, previous, info)`` from
        ``doc_to_text(doc, previous_output=answers so far, round_idx=k, previous_round_info=info)``
        and stops when ``done``. The documents of a batch go through their rounds together."""
        out: list[list[str] | None] = [None] * len(requests)
        pbar = _progress(len(requests), self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            states = []
            for i in range(start, min(start + self.batch_size, len(requests))):
                context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = requests[i].args
                settings, stops = generation_settings(gen_kwargs, default_max_new_tokens=self.max_new_tokens)
                doc = self._doc(task, split, doc_id)
                states.append({"i": i, "doc": doc, "context": context,
                               "visuals_of": functools.partial(self._visuals, doc_to_visual, task, split, doc_id),
                               "doc_to_text": doc_to_text, "settings": settings, "stops": stops, "answers": [],
                               "info": None, "id": f"{task}/{split}/{doc_id}"})
            active = states
            for round_idx in range(self.MAX_ROUNDS):
                if round_idx:
                    still = []
                    for s in active:
                        visuals, context, done, previous, info = s["doc_to_text"](
                            s["doc"], previous_output=list(s["answers"]), round_idx=round_idx,
                            previous_round_info=s["info"])
                        if previous is not None:
                            s["answers"] = list(previous)
                        if not done:
                            s.update(context=context, visuals_of=lambda v=visuals: v, info=info)
                            still.append(s)
                    active = still
                if not active:
                    break
                by_settings: dict[GenSettings, list] = {}
                for s in active:
                    by_settings.setdefault(s["settings"], []).append(s)
                for settings, group in by_settings.items():
                    ids = [f"{s['id']}/round{round_idx}" for s in group]
                    reqs = [self._request(s["context"], s["visuals_of"], rid) for s, rid in zip(group, ids)]
                    for s, text in zip(group, self._generate(reqs, ids, settings)):
                        s["answers"].append(cut_at_stops(text, s["stops"]))
            else:
                raise SampleError(f"generate_until_multi_round: a task went past {self.MAX_ROUNDS} rounds")
            for s in states:
                out[s["i"]] = s["answers"]
            pbar.update(len(states))
        pbar.close()
        return out  # type: ignore[return-value]


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=disable, desc="fusionlm")


def _parse_args(arg_string: str) -> dict:
    """``key=value,…`` as lmms-eval parses it (its own parser when installed)."""
    try:
        from lmms_eval.utils import simple_parse_args_string
    except ImportError:
        simple_parse_args_string = None
    if simple_parse_args_string is not None:
        return simple_parse_args_string(arg_string or "")
    out = {}
    for part in (arg_string or "").split(","):
        if part.strip():
            key, _, value = part.partition("=")
            out[key.strip()] = _value(value.strip())
    return out


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------- lmms-eval registration

_LMMS_CLASS: type | None = None


def lmms_class() -> type:
    """``FusionLMEval``: ``FusionLMAdapter`` as a subclass of lmms-eval's ``lmms`` (built on first
    use, so that importing this module never needs lmms-eval)."""
    global _LMMS_CLASS
    if _LMMS_CLASS is None:
        try:
            from lmms_eval.api.model import lmms
        except ImportError as exc:
            raise ImportError(f"lmms-eval is not installed: pip install 'fusionlm[lmms]' "
                              f"(lmms-eval=={LMMS_EVAL_VERSION}) ({exc})") from None
        _LMMS_CLASS = type("FusionLMEval", (FusionLMAdapter, lmms), {
            "__module__": MODULE, "__qualname__": "FusionLMEval",
            "__doc__": "A fusionlm checkpoint as an lmms-eval model (``--model fusionlm``).\n\n"
                       + (FusionLMAdapter.__doc__ or ""),
        })
    return _LMMS_CLASS


def manifest():
    """lmms-eval's ``ModelManifest`` for ``fusionlm`` (also usable as an ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> type:
    """Register ``FusionLMEval`` with lmms-eval under ``fusionlm``: in the registry its evaluator
    resolves names with (``lmms_eval.models``' manifests) and in the ``register_model`` one."""
    cls = lmms_class()
    from lmms_eval.api.registry import register_model
    from lmms_eval.models import AVAILABLE_MODELS, MODEL_REGISTRY_V2

    register_model(MODEL_NAME)(cls)
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    AVAILABLE_MODELS[MODEL_NAME] = "FusionLMEval"
    return cls


def __getattr__(name: str):
    if name == "FusionLMEval":
        return lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_if_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is None:
        return
    try:
        register()
    except Exception as exc:  # a broken or half-imported lmms-eval must not break fusionlm
        log.debug("fusionlm: not registered with lmms-eval (%s)", exc)


def main(argv: list[str] | None = None) -> None:
    """``python -m fusionlm.evaluate.lmms ARGS``: lmms-eval's CLI, with ``--model fusionlm`` known."""
    import sys

    register()
    from lmms_eval.cli.dispatch import main as lmms_main

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    lmms_main()


if __name__ == "__main__":  # run lmms-eval with the canonical module's class registered
    from fusionlm.evaluate.lmms import main as _main

    _main()
else:
    _register_if_installed()
