"""The serving engine: one model, many requests at once, on a thread of its own.

Requests (``Ask``) queue in an inbox. Between decoding steps the engine admits as many as there
are free rows of its ``runtime.SlotDecoder`` (each prompt prefilled into its row), then runs one
step for every active row; a request leaves its row when it ends, and the next one takes the row
at the following step boundary (continuous batching). Each request's text reaches its ``sink`` as
it is written (``Delta``), then a ``Done`` (or a ``Failed``).

Pictures are encoded once per request, their connector outputs kept in a ``FeatureCache`` keyed
by the content of the encoder input, so the same picture in a follow-up turn is not encoded
again. Designs whose pictures are reached through cross-attention (Method B, the hybrid) and
LLMs the slot decoder cannot run (``runtime.unsupported``) are served one request at a time on
the general path, as ``generate`` decodes them, and the engine says so (``Engine.mode``).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.pixels.processing import ImageBatch, ImageInput
from ..device import model_device
from ..errors import FusionError, SampleError, first_line
from ..generate import GeneralDecoder, never_written, sampling_probs, stop_ids
from ..model import FusionLM
from ..runtime import SlotDecoder, StaticDecoder, unsupported


@dataclass
class Ask:
    """One answer to write: a prompt's ids and its pictures' encoder inputs, and how to write it."""

    ids: list[int]
    inputs: list[ImageInput] = field(default_factory=list)
    drawn: list[torch.Tensor] = field(default_factory=list)  # early fusion: the pictures it shows, as pixels
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # each written token's log-probability and this many alternatives; None: none
    image_tokens: int = 0  # positions the prompt's pictures take (``Prompted.image_positions``), for usage
    id: str = "ask"
    cancelled: bool = False
    deadline: float | None = None  # time.monotonic() past which it ends ("length")


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[dict, ...] = ()  # OpenAI's entries of the tokens written since the last Delta (if asked)


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    first_token_s: float  # from admission to the first token


@dataclass(frozen=True)
class Failed:
    message: str
    internal: bool = False  # fusionlm's fault (its traceback is in the log), not the request's


Sink = Callable[[object], None]


class FeatureCache:
    """Connector outputs by the content of their encoder input, least recently used out first,
    bounded in megabytes; hits and misses counted."""

    def __init__(self, megabytes: float):
        self.limit, self.size = int(megabytes * 2**20), 0
        self.items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(inp: ImageInput) -> str:
        digest = hashlib.sha256(inp.pixels.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr((inp.grid, inp.role, sorted((k, tuple(v.shape)) for k, v in inp.extras.items()))).encode())
        for name in sorted(inp.extras):
            digest.update(inp.extras[name].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        found = self.items.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return found

    def put(self, key: str, features: torch.Tensor) -> None:
        nbytes = features.numel() * features.element_size()
        if nbytes > self.limit or key in self.items:
            return
        self.items[key] = features
        self.size += nbytes
        while self.size > self.limit:
            _, old = self.items.popitem(last=False)
            self.size -= old.numel() * old.element_size()


class _Writing:
    """One admitted request: what it has written and how it chooses its next token."""

    def __init__(self, ask: Ask, sink: Sink, device, prompt_tokens: int, image_tokens: int):
        self.ask, self.sink = ask, sink
        self.tokens: list[int] = []
        self.sent = 0  # characters of the answer already sent
        self.generator = torch.Generator(device).manual_seed(ask.seed or 0) if ask.temperature > 0 else None
        self.prompt_tokens, self.image_tokens = prompt_tokens, image_tokens
        self.started = time.monotonic()
        self.first_token_s = 0.0
        self.pending = -1  # the token chosen last, fed at the next step
        self.logprobs: list[dict] = []  # OpenAI's entry of each token written (``Ask.logprobs``)
        self.sent_logprobs = 0
        self.last_logprob: dict | None = None  # of the token just chosen


class Engine:
    """Continuous batching of ``Ask``s over one model (see the module's docstring)."""

    def __init__(self, model: FusionLM, tokenizer, *, slots: int = 8, cache_mb: float = 256.0,
                 length: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.length = length or model.config.llm.max_length
        self.slots = slots
        self.device = model_device(model)
        why = unsupported(model, self.length)
        if model.design.cross:
            why = f"the {model.design.name} design reads pictures through cross-attention"
        self.solo_reason = why  # None: continuous batching
        self.cache = FeatureCache(cache_mb)
        self.end = set(stop_ids(model))
        self.never = torch.tensor(never_written(model), device=self.device, dtype=torch.long)
        self.inbox: collections.deque[tuple[Ask, Sink]] = collections.deque()
        self.calls: collections.deque[tuple[Callable[[], object], Sink]] = collections.deque()
        self.wake = threading.Condition()
        self.running: list[_Writing] = []  # row i of the decoder: running[i]
        self.stopping = False
        self.decoder = SlotDecoder(model, slots, self.length) if why is None else None
        self.thread = threading.Thread(target=self._loop, name="fusionlm-engine", daemon=True)

    @property
    def mode(self) -> str:
        if self.solo_reason is None:
            return f"continuous batching, {self.slots} rows of {self.length} positions"
        return f"one request at a time on the general path ({self.solo_reason})"

    @property
    def queued(self) -> int:
        return len(self.inbox)

    @property
    def active(self) -> int:
        return len(self.running)

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def submit(self, ask: Ask, sink: Sink) -> None:
        with self.wake:
            self.inbox.append((ask, sink))
            self.wake.notify()

    def call(self, fn: Callable[[], object], sink: Sink) -> None:
        """Runs ``fn()`` on the engine's thread between two steps (drawing, an answer in text and
        pictures: work that decodes a batch of its own); its result, or a ``Failed``, goes to ``sink``."""
        with self.wake:
            self.calls.append((fn, sink))
            self.wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes what is admitted and queued, then ends the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.inbox and not self.running and not self.calls and not self.stopping:
                    self.wake.wait()
                if self.stopping and not self.inbox and not self.running and not self.calls:
                    return
            self._run_calls()
            try:
                if self.decoder is None:
                    self._solo()
                else:
                    self._admit(1 if self.running else self.slots)  # one prefill between two steps, at most
                    self._step()
            except Exception as exc:  # an internal fault: every request in hand fails, the engine goes on
                self._fail_all(exc)

    def _run_calls(self) -> None:
        while self.calls:
            fn, sink = self.calls.popleft()
            try:
                with torch.no_grad():
                    sink(fn())
            except FusionError as exc:
                sink(Failed(first_line(exc)))
            except Exception:
                logging.getLogger("fusionlm.serve").exception("engine fault in a call")
                sink(Failed("internal error", internal=True))

    def _take(self) -> tuple[Ask, Sink] | None:
        with self.wake:
            while self.inbox:
                ask, sink = self.inbox.popleft()
                if not ask.cancelled:
                    return ask, sink
                sink(Done("cancelled", len(ask.ids), 0, 0, 0.0))
        return None

    def _next(self):
        """(ask, sink, ids, context, image positions) of the next request to start, its prompt
        encoded; a request whose prompt fails is answered ``Failed`` and passed over. None: none waits."""
        while (taken := self._take()) is not None:
            ask, sink = taken
            try:
                return (ask, sink, *self._prompt(ask))
            except FusionError as exc:  # this request's own fault: it fails alone
                sink(Failed(first_line(exc)))
        return None

    @torch.no_grad()
    def _admit(self, most: int) -> None:
        """Prefills up to ``most`` waiting requests into free rows. While rows are decoding, one per
        step: a newcomer's prefill holds up the others' next token by one prompt, never by several."""
        for _ in range(min(most, self.decoder.free)):
            if (taken := self._next()) is None:
                return
            ask, sink, ids, context, images = taken
            try:
                logits = self.decoder.admit(torch.tensor(ids, device=self.device), context)  # (V,)
            except FusionError as exc:
                sink(Failed(first_line(exc)))
                continue
            state = _Writing(ask, sink, self.device, len(ids), images)
            self.running.append(state)
            self._choose(len(self.running) - 1, logits)

    @torch.no_grad()
    def _step(self) -> None:
        if not self.running:
            return
        tokens = torch.tensor([s.pending for s in self.running], device=self.device)  # (A,)
        logits = self.decoder.step(tokens)  # (A, V)
        for row in reversed(range(len(self.running))):  # from the end: a release moves the last row only
            self._choose(row, logits[row])

    def _choose(self, row: int, logits: torch.Tensor) -> None:
        """The next token of the request in ``row``, sent; the row released when it has ended."""
        state = self.running[row]
        token = self._pick(state, logits)
        reason = self._advance(state, token, self.decoder.room(row))
        if reason is not None:  # its row is free before its Done is sent
            self.running[row] = self.running[-1]
            self.running.pop()
            self.decoder.release(row)
            self._finish(state, reason)

    def _pick(self, state: _Writing, logits: torch.Tensor) -> int:
        logits = logits.index_fill(-1, self.never[self.never < logits.shape[-1]], float("-inf"))  # (V,)
        ask = state.ask
        if ask.temperature <= 0:
            token = int(logits.argmax())
        else:
            probs = sampling_probs(logits[None], ask.temperature, ask.top_p)  # (1, V)
            token = int(torch.multinomial(probs, 1, generator=state.generator))
        if ask.logprobs is not None:
            state.last_logprob = self._logprob(logits, token, ask.logprobs)
        return token

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> dict:
        """OpenAI's logprobs entry of ``token``: its log-probability under the model's distribution
        (what text may be written, at temperature 1) and the ``top`` most likely tokens'."""
        logp = torch.log_softmax(logits.float(), -1)  # (V,)

        def entry(t: int) -> dict:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": float(logp[t]), "bytes": list(text.encode())}

        best = logp.topk(top).indices.tolist() if top else []
        return {**entry(token), "top_logprobs": [entry(t) for t in best]}

    def _advance(self, state: _Writing, token: int, room: int) -> str | None:
        """Takes ``token`` into the answer and sends what is new; the finish reason once it has ended."""
        ask = state.ask
        if not state.tokens:
            state.first_token_s = time.monotonic() - state.started
        if ask.cancelled:
            return "cancelled"
        if token in self.end:
            return "stop"
        state.tokens.append(token)
        state.pending = token
        if state.last_logprob is not None:
            state.logprobs.append(state.last_logprob)
        text = self.tokenizer.decode(state.tokens, skip_special_tokens=True)
        for stop in ask.stop:
            at = text.find(stop)
            if at >= 0:
                self._send(state, text[:at], final=True)
                return "stop:" + stop
        out_of_time = ask.deadline is not None and time.monotonic() > ask.deadline
        if len(state.tokens) >= ask.max_tokens or room <= 0 or out_of_time:
            self._send(state, text, final=True)
            return "length"
        self._send(state, text, final=False, hold=max((len(s) for s in ask.stop), default=1) - 1)
        return None

    def _send(self, state: _Writing, text: str, *, final: bool, hold: int = 0) -> None:
        """Sends the part of ``text`` not sent yet: without its leading whitespace, and (unless
        ``final``) without trailing whitespace, a half-decoded character or the last ``hold``
        characters, which a stop string may still claim. What is sent adds up to ``text.strip()``."""
        text = text.lstrip()
        if not final:
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip().rstrip("\ufffd")
        else:
            text = text.rstrip()
        if len(text) > state.sent or (final and state.sent_logprobs < len(state.logprobs)):
            state.sink(Delta(text[state.sent:], tuple(state.logprobs[state.sent_logprobs:])))
            state.sent, state.sent_logprobs = max(len(text), state.sent), len(state.logprobs)

    def _finish(self, state: _Writing, reason: str) -> None:
        if not reason.startswith("stop:"):  # a stop string sent its text already, cut before it
            self._send(state, self.tokenizer.decode(state.tokens, skip_special_tokens=True), final=True)
        state.sink(Done("stop" if reason.startswith("stop") else reason, state.prompt_tokens, len(state.tokens),
                        state.image_tokens, state.first_token_s))

    def _fail_all(self, exc: Exception) -> None:
        logging.getLogger("fusionlm.serve").exception("engine fault")
        for state in self.running:
            state.sink(Failed("internal error", internal=True))
        self.running.clear()
        if self.decoder is not None:
            self.decoder.active = 0
            self.decoder.valid.zero_()

    # ------------------------------------------------------------------ prompts and pictures

    def _prompt(self, ask: Ask):
        """(ids, the decoder's image context, image positions) of one request, its pictures
        encoded (through the cache where the design allows)."""
        model = self.model
        ids = model.coded(ask.ids, ask.drawn) if ask.drawn else list(ask.ids)
        images = ask.image_tokens
        if len(ids) >= self.length:
            raise SampleError(f"the prompt takes {len(ids)} tokens, leaving no room in the context of {self.length}")
        batch = ImageBatch.collate(ask.inputs)
        if batch is None:
            return ids, None, images
        tensor = torch.tensor([ids], device=self.device)
        batch = batch.to(self.device)
        if batch.pools or model.design.cross:  # video frames pooled across inputs, or keys/values per request
            return ids, model.encode_images(batch, tensor), images
        return ids, self._cached_context(batch, ask.inputs, tensor), images

    def _cached_context(self, batch: ImageBatch, inputs: list[ImageInput], ids: torch.Tensor):
        model = self.model
        keys = [FeatureCache.key(inp) for inp in inputs]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = ImageBatch.collate([inputs[i] for i in missing]).to(self.device)
            features = model.image_features(fresh)  # (M, N, D)
            for i, f, n in zip(missing, features, model.slot_tokens(fresh)):
                found[i] = f[:n]
                self.cache.put(keys[i], found[i])
        width = max(f.shape[0] for f in found)
        padded = found[0].new_zeros(len(found), width, found[0].shape[-1])  # (I, N, D)
        for i, f in enumerate(found):
            padded[i, : f.shape[0]] = f
        return model.design.context(model, batch, padded, [f.shape[0] for f in found], ids)

    # ------------------------------------------------------------------ one at a time

    @torch.no_grad()
    def _solo(self) -> None:
        """One request on the general path (cross-attention designs, LLMs the slot decoder cannot run)."""
        taken = self._next()
        if taken is None:
            return
        ask, sink, ids, context, images = taken
        model = self.model
        tensor = torch.tensor([ids], device=self.device)
        length = min(self.length, len(ids) + ask.max_tokens)
        if unsupported(model, length) is None:
            decoder = StaticDecoder(model, 1, length)
        else:
            decoder = GeneralDecoder(model, True)
        state = _Writing(ask, sink, self.device, len(ids), images)
        logits = decoder.prefill(tensor, torch.ones_like(tensor), context)[0]  # (V,)
        while True:
            token = self._pick(state, logits)
            reason = self._advance(state, token, length - len(ids) - len(state.tokens))
            if reason is not None:
                self._finish(state, reason)
                return
            logits = decoder.step(torch.tensor([token], device=self.device))[0]

