"""``FusionLMAdapter``: a fusionlm checkpoint answering lmms-eval's three kinds of request."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable

import torch

from ...data.pixels.processing import ImageSpec
from ...device import model_device
from ...errors import FusionError, SampleError
from ...generate import MAX_NEW_TOKENS, Request, generate
from .requests import GenSettings, cut_at_stops, generation_settings, to_request
from .scoring import loglikelihoods

log = logging.getLogger("fusionlm.lmms")


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
            from ...checkpoint import load_model

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
