"""The HTTP server: OpenAI's chat-completions API over one ``Engine``, with health, readiness,
Prometheus metrics and a chat page.

A chat request is admitted (or refused with 429 when the engine's rows and queue are full) before
its body is read past the size limit, before any picture is fetched or decoded. Its pictures then
go through ``media.fetch`` and the one image loader training uses, its prompt through the one
``PromptEncoder``, and its answer (or ``n`` of them) through the engine. A client that goes away
cancels its request wherever it is: fetching, preprocessing, waiting or decoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..data.chat import SkipSample
from ..data.pixels.images import DEFAULT_MAX_PIXELS, load_image
from ..data.pixels.processing import ImageSpec
from ..data.prompt import PromptEncoder
from ..data.sample import IMAGE_TOKEN, Sample
from ..errors import FusionError
from ..generate import MAX_NEW_TOKENS
from .engine import Ask, Delta, Done, Engine, Failed
from .media import MediaError, MediaPolicy, fetch
from .pictures import answering, check_modalities, drawing, parse_images
from .protocol import ApiError, ChatRequest, chunk, completion, parse_chat, usage

log = logging.getLogger("fusionlm.serve")
PAGE = Path(__file__).with_name("page")


@dataclass(frozen=True)
class ServeSettings:
    """What ``fusionlm serve`` is told (its flags)."""

    checkpoint: str
    model_name: str | None = None  # the id /v1/models lists; default: the checkpoint's folder name
    device: str = "cpu"
    slots: int = 8  # requests decoded at once
    max_queue: int = 32  # requests waiting for a row; beyond rows + queue: 429 at once
    max_body_bytes: int = 32 * 2**20
    body_timeout: float = 10.0  # seconds to send the whole body (408 after)
    request_timeout: float = 300.0  # a request's whole life; its answer ends ("length") after
    max_images: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache_mb: float = 256.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    media: MediaPolicy = field(default_factory=MediaPolicy)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, state: "State"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fusionlm_requests", "requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.tokens = Counter("fusionlm_generated_tokens", "tokens written", registry=r)
        self.first_token = Histogram("fusionlm_time_to_first_token_seconds", "from admission to the first token",
                                     registry=r)
        self.inter_token = Histogram("fusionlm_inter_token_latency_seconds", "between two streamed pieces",
                                     buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5), registry=r)
        Gauge("fusionlm_queue_length", "requests waiting for a row", registry=r).set_function(
            lambda: state.engine.queued if state.engine else 0)
        Gauge("fusionlm_running_batch_size", "requests being decoded", registry=r).set_function(
            lambda: state.engine.active if state.engine else 0)
        Gauge("fusionlm_image_cache_hits", "encoder inputs found in the feature cache", registry=r).set_function(
            lambda: state.engine.cache.hits if state.engine else 0)
        Gauge("fusionlm_image_cache_misses", "encoder inputs encoded", registry=r).set_function(
            lambda: state.engine.cache.misses if state.engine else 0)


class State:
    """The loaded model and its engine (None while loading), and the requests in hand."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.engine: Engine | None = None
        self.prompts: PromptEncoder | None = None
        self.name = settings.model_name or Path(settings.checkpoint).resolve().name
        self.preparing = 0  # admitted, their pictures being fetched and their prompts encoded
        self.failed: str | None = None
        self.metrics = Metrics(self)

    def load(self) -> None:
        from ..checkpoint import load_model

        try:
            model, tokenizer, config = load_model(self.settings.checkpoint, device=self.settings.device)
            spec = ImageSpec.for_model(model, config)
            spec = replace(spec, max_pixels=self.settings.max_pixels)
            self.prompts = PromptEncoder.of(model, tokenizer, spec)
            self.engine = Engine(model, tokenizer, slots=self.settings.slots, cache_mb=self.settings.cache_mb).start()
            log.info("serving %s: %s", self.name, self.engine.mode)
        except Exception as exc:  # the server stays up and says why it is not ready
            self.failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.exception("could not load %s", self.settings.checkpoint)

    @property
    def capacity(self) -> int:
        return self.settings.slots + self.settings.max_queue

    @property
    def in_hand(self) -> int:
        """Answers admitted and not finished: being prepared, queued or decoded."""
        return self.preparing + self.engine.queued + self.engine.active


def create_app(settings: ServeSettings, *, load_now: bool = False) -> FastAPI:
    """The app for ``settings``; the model loads on a thread at start-up (``load_now``: before)."""
    state = State(settings)
    if load_now:
        state.load()

    async def lifespan(app):
        loader = None if load_now else threading.Thread(target=state.load, name="fusionlm-load", daemon=True)
        if loader is not None:
            loader.start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop, 30.0)

    app = FastAPI(title="fusionlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.fusionlm = state
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def request_ids(request: Request, call_next):
        rid = request.headers.get("x-request-id") or secrets.token_hex(8)
        request.state.rid = rid[:64]
        try:
            response = await call_next(request)
        except Exception:  # an unexpected fault: its traceback stays in the log
            log.exception("request %s: internal error", request.state.rid)
            response = _error(ApiError(500, "internal error"))
        response.headers["x-request-id"] = request.state.rid
        route = request.url.path if request.url.path in ("/v1/chat/completions", "/v1/models") else "other"
        state.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.engine is not None:
            return {"status": "ready", "model": state.name, "mode": state.engine.mode}
        status = "failed: " + state.failed if state.failed else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, settings)
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "fusionlm"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _check_key(request, settings)
        _admit(state)
        return await _answer(request, state)

    @app.post("/v1/images/generations")
    async def images(request: Request):
        _check_key(request, settings)
        model = _admit(state)
        if not model.draws:
            raise ApiError(400, "this model does not draw (model.generation.kind: none)", param="model")
        asked = parse_images(await _read_body(request, settings), model)
        state.preparing += 1
        try:
            return await _on_engine(state, drawing(model, state.engine.tokenizer, state.prompts.spec, asked))
        finally:
            state.preparing -= 1

    @app.get("/")
    async def page():
        return FileResponse(PAGE / "index.html", media_type="text/html")

    @app.get("/page/{name}")
    async def page_file(name: str):
        path = PAGE / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(404, f"no page file {name[:40]!r}")
        return FileResponse(path)

    return app


def _admit(state: State):
    """The model, if the server can take one more request now (else 503 while loading, 429 when full)."""
    if state.engine is None:
        raise ApiError(503, "the model is still loading" if not state.failed else "the model could not be loaded",
                       retry_after=5)
    if state.in_hand >= state.capacity:
        raise ApiError(429, f"busy: {state.in_hand} requests in hand, the limit is {state.capacity}", retry_after=1)
    return state.engine.model


async def _on_engine(state: State, fn):
    """``fn()``'s result, run on the engine's thread between its steps (``Engine.call``)."""
    loop = asyncio.get_running_loop()
    settled = loop.create_future()
    state.engine.call(fn, lambda result: loop.call_soon_threadsafe(
        lambda: settled.done() or settled.set_result(result)))
    result = await settled
    if isinstance(result, Failed):
        raise ApiError(500 if result.internal else 400, result.message)
    return result


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _check_key(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")


# ----------------------------------------------------------------------------- one chat request


async def _read_body(request: Request, settings: ServeSettings) -> bytes:
    """The body, refused past ``max_body_bytes`` (413, before it is all read) or ``body_timeout`` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise ApiError(413, f"the body is {declared} bytes, over the limit of {settings.max_body_bytes}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout):
            async for piece in request.stream():
                size += len(piece)
                if size > settings.max_body_bytes:
                    raise ApiError(413, f"the body is over the limit of {settings.max_body_bytes} bytes")
                chunks.append(piece)
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {settings.body_timeout:g} s") from None
    return b"".join(chunks)


async def _pictures(chat: ChatRequest, settings: ServeSettings) -> list:
    """Each image part fetched and decoded by the one image loader, concurrently."""

    async def one(part):
        data = await fetch(part.url, settings.media, param=part.param)
        try:
            return await asyncio.to_thread(load_image, data, max_pixels=settings.max_pixels)
        except FusionError as exc:
            raise ApiError(400, f"{part.param}: {str(exc).replace('<bytes>: ', '')}", param=part.param) from None

    try:
        return list(await asyncio.gather(*(one(p) for p in chat.pictures)))
    except MediaError as exc:
        raise ApiError(exc.status, str(exc), param=exc.param) from None


def _sample(chat: ChatRequest, pictures: list, rid: str) -> Sample:
    """The conversation as a fusionlm sample: each image part becomes an ``<image>`` placeholder."""
    messages = []
    for role, parts in chat.messages:
        text = "".join(IMAGE_TOKEN if p.url is not None else p.text.replace(IMAGE_TOKEN, "") for p in parts)
        messages.append({"role": role, "content": text})
    return Sample(id=rid, task="chat", messages=messages, images=pictures)


def _asks(chat: ChatRequest, prompted, state: State, rid: str) -> list[Ask]:
    room = state.engine.length - len(prompted.encoded.input_ids)
    budget = min(chat.max_tokens or MAX_NEW_TOKENS, room)
    if chat.max_tokens is not None and chat.max_tokens > room:
        raise ApiError(400, f"max_tokens: the prompt takes {len(prompted.encoded.input_ids)} of the context's "
                            f"{state.engine.length} tokens, leaving {room}, fewer than {chat.max_tokens}",
                       param="max_tokens")
    deadline = time.monotonic() + state.settings.request_timeout
    return [Ask(prompted.encoded.input_ids, prompted.inputs, prompted.drawn, max_tokens=budget,
                temperature=chat.temperature, top_p=chat.top_p,
                seed=None if chat.seed is None else chat.seed + i, stop=chat.stop, id=f"{rid}/{i}",
                image_tokens=prompted.image_positions,
                deadline=deadline) for i in range(chat.n)]


async def _answer(request: Request, state: State):
    settings, rid = state.settings, request.state.rid
    body = await _read_body(request, settings)
    chat = parse_chat(body, max_images=settings.max_images)
    state.preparing += 1
    work = asyncio.ensure_future(_prepare(chat, state, rid))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: fetching and preprocessing stop
            work.cancel()
            return Response(status_code=499)
        asks = work.result()
        if isinstance(asks, tuple):  # an answer in text and pictures: drawn on the engine's thread
            return await _with_pictures(chat, state, rid, *asks)
    finally:
        watcher.cancel()
        state.preparing -= 1
    events = [asyncio.Queue() for _ in asks]
    loop = asyncio.get_running_loop()
    for ask, queue in zip(asks, events):
        state.engine.submit(ask, lambda ev, q=queue: loop.call_soon_threadsafe(q.put_nowait, ev))
    if chat.stream:
        return StreamingResponse(_stream(request, chat, asks, events, state, rid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _whole(request, chat, asks, events, state, rid)


async def _prepare(chat: ChatRequest, state: State, rid: str):
    """The request's ``Ask``s; or, for an answer in text and pictures, (its sample, its prompt)."""
    with_pictures = check_modalities(chat.modalities, state.engine.model.draws)
    pictures = await _pictures(chat, state.settings)
    sample = _sample(chat, pictures, rid)
    try:
        prompted = await asyncio.to_thread(state.prompts.sample, sample, generation_prompt=True)
    except SkipSample as exc:
        raise ApiError(400, f"messages: {exc.reason if hasattr(exc, 'reason') else exc}", param="messages") from None
    except FusionError as exc:
        raise ApiError(400, f"messages: {str(exc).replace(f'sample {rid}: ', '')}", param="messages") from None
    if with_pictures:
        return sample, prompted
    return _asks(chat, prompted, state, rid)


async def _with_pictures(chat: ChatRequest, state: State, rid: str, sample, prompted):
    """One answer in text and pictures (``converse.answer``), whole or as one streamed piece."""
    if chat.n != 1:
        raise ApiError(400, "n: an answer with pictures is written once (n: 1)", param="n")
    engine = state.engine
    fn = answering(engine.model, engine.tokenizer, state.prompts.spec, sample, max_tokens=chat.max_tokens or MAX_NEW_TOKENS,
                   temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed)
    text, written = await _on_engine(state, fn)
    use = usage(len(prompted.encoded.input_ids), written, prompted.image_positions)
    if not chat.stream:
        return completion(f"chatcmpl-{rid}", state.name, [(text, "stop")], use)

    async def events():
        created, cid = int(time.time()), f"chatcmpl-{rid}"
        yield chunk(cid, state.name, created, 0, {"role": "assistant", "content": ""})
        yield chunk(cid, state.name, created, 0, {"content": text})
        yield chunk(cid, state.name, created, 0, {}, "stop")
        if chat.include_usage:
            yield chunk(cid, state.name, created, None, use=use)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def _events(queue: asyncio.Queue, state: State, last: list[float]):
    """One answer's events until its ``Done`` / ``Failed``, timing its pieces."""
    while True:
        event = await queue.get()
        now = time.monotonic()
        if isinstance(event, Delta):
            if last[0]:
                state.metrics.inter_token.observe(now - last[0])
            last[0] = now
        yield event
        if isinstance(event, (Done, Failed)):
            return


async def _whole(request, chat, asks, events, state: State, rid: str):
    async def one(queue):
        text, done = [], None
        async for event in _events(queue, state, [0.0]):
            if isinstance(event, Delta):
                text.append(event.text)
            else:
                done = event
        return "".join(text), done

    gathered = asyncio.ensure_future(asyncio.gather(*(one(q) for q in events)))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():  # the client went away: its rows are freed at the next step
            for ask in asks:
                ask.cancelled = True
            await gathered
            return Response(status_code=499)
        results = gathered.result()
    finally:
        watcher.cancel()
    failed = [d for _, d in results if isinstance(d, Failed)]
    if failed:
        raise ApiError(500 if failed[0].internal else 400, failed[0].message)
    _observe(state, [d for _, d in results])
    first = results[0][1]
    use = usage(first.prompt_tokens, sum(d.completion_tokens for _, d in results), first.image_tokens)
    return completion(f"chatcmpl-{rid}", state.name, [(t, d.finish_reason) for t, d in results], use)


async def _stream(request, chat, asks, events, state: State, rid: str):
    created, cid = int(time.time()), f"chatcmpl-{rid}"
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i, queue):
        async for event in _events(queue, state, [0.0]):
            await merged.put((i, event))

    pumps = [asyncio.ensure_future(pump(i, q)) for i, q in enumerate(events)]
    finished: list[Done] = []
    try:
        for i in range(len(asks)):
            yield chunk(cid, state.name, created, i, {"role": "assistant", "content": ""})
        while len(finished) < len(asks):
            i, event = await merged.get()
            if isinstance(event, Delta):
                yield chunk(cid, state.name, created, i, {"content": event.text})
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(ApiError(500 if event.internal else 400, event.message).body())}\n\n"
                finished.append(Done("error", 0, 0, 0, 0.0))
            else:
                finished.append(event)
                yield chunk(cid, state.name, created, i, {}, event.finish_reason)
        real = [d for d in finished if d.finish_reason != "error"]
        _observe(state, real)
        if chat.include_usage and real:
            use = usage(real[0].prompt_tokens, sum(d.completion_tokens for d in real), real[0].image_tokens)
            yield chunk(cid, state.name, created, None, use=use)
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream: the engine frees the rows
        for ask in asks:
            ask.cancelled = True
        for p in pumps:
            p.cancel()


def _observe(state: State, done: list[Done]) -> None:
    for d in done:
        state.metrics.tokens.inc(d.completion_tokens)
        state.metrics.first_token.observe(d.first_token_s)


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Runs the server until interrupted; in-flight requests finish before it exits."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    print(f"fusionlm serve: http://{shown}:{port}/ (OpenAI API at http://{shown}:{port}/v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                h11_max_incomplete_event_size=64 * 1024)


def api_key_from_env() -> str | None:
    return os.environ.get("FUSIONLM_API_KEY") or None


__all__ = ["ServeSettings", "create_app", "serve", "api_key_from_env"]
