"""One chat request, from its body to its answer: read under the body limits, parsed, its pictures
fetched and decoded, its prompt encoded, then answered by the engine whole or streamed as
server-sent events; a client that goes away cancels it wherever it is."""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..data.chat import PLACEHOLDERS
from ..data.pixels.images import load_image
from ..data.pixels.video import Video
from ..data.sample import IMAGE_TOKEN, VIDEO_TOKEN, Sample
from ..errors import FusionError, ImageError
from ..generate import MAX_NEW_TOKENS
from .engine import Ask, Delta, Done, Failed
from .media import MediaError, fetch
from .pictures import answering, check_modalities
from .protocol import ApiError, ChatRequest, chunk, completion, parse_chat, usage

if TYPE_CHECKING:
    from .state import ServeSettings, State

CLIP_FORMATS = {"GIF": "gif", "WEBP": "webp", "PNG": "png"}  # animated files the video loader reads


async def on_engine(state: "State", fn):
    """``fn()``'s result, run on the engine's thread between its steps (``Engine.call``)."""
    loop = asyncio.get_running_loop()
    settled = loop.create_future()
    state.engine.call(fn, lambda result: loop.call_soon_threadsafe(
        lambda: settled.done() or settled.set_result(result)))
    result = await settled
    if isinstance(result, Failed):
        raise ApiError(500 if result.internal else 400, result.message)
    return result


async def read_body(request: Request, settings: "ServeSettings") -> bytes:
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


async def _pictures(chat: ChatRequest, settings: "ServeSettings", folder: str) -> list:
    """Each image part fetched and decoded by the one image loader, concurrently; each video part
    fetched and kept in ``folder`` as the animated file it is, a ``Video`` (its frames are sampled
    and decoded by the one loader when the prompt is encoded)."""

    async def one(k: int, part):
        data = await fetch(part.url, settings.media, param=part.param)
        try:
            if part.video:
                return await asyncio.to_thread(_clip, data, Path(folder) / f"clip-{k}")
            return await asyncio.to_thread(load_image, data, max_pixels=settings.max_pixels)
        except FusionError as exc:
            raise ApiError(400, f"{part.param}: {str(exc).replace('<bytes>: ', '')}", param=part.param) from None

    try:
        return list(await asyncio.gather(*(one(k, p) for k, p in enumerate(chat.pictures))))
    except MediaError as exc:
        raise ApiError(exc.status, str(exc), param=exc.param) from None


def _clip(data: bytes, stem: Path) -> Video:
    """The bytes of an animated GIF, WebP or PNG, written to ``stem`` + its suffix, as a ``Video``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = img.format
    except (OSError, ValueError):
        raise ImageError("not an animated GIF, WebP or PNG (video files are not decoded: send their frames "
                         "as an animated GIF)") from None
    if kind not in CLIP_FORMATS:
        raise ImageError(f"a {kind} file is not a clip (an animated GIF, WebP or PNG)")
    path = stem.with_suffix("." + CLIP_FORMATS[kind])
    path.write_bytes(data)
    return Video(str(path))


def _sample(chat: ChatRequest, pictures: list, rid: str) -> Sample:
    """The conversation as a fusionlm sample: each image part becomes an ``<image>`` placeholder,
    each video part a ``<video>`` one."""
    messages = []
    for role, parts in chat.messages:
        text = "".join((VIDEO_TOKEN if p.video else IMAGE_TOKEN) if p.url is not None else
                       PLACEHOLDERS.sub("", p.text) for p in parts)
        messages.append({"role": role, "content": text})
    return Sample(id=rid, task="chat", messages=messages, images=pictures)


def _asks(chat: ChatRequest, prompted, state: "State", rid: str) -> list[Ask]:
    room = state.engine.length - len(prompted.encoded.input_ids)
    budget = min(chat.max_tokens or MAX_NEW_TOKENS, room)
    if chat.max_tokens is not None and chat.max_tokens > room:
        raise ApiError(400, f"max_tokens: the prompt takes {len(prompted.encoded.input_ids)} of the context's "
                            f"{state.engine.length} tokens, leaving {room}, fewer than {chat.max_tokens}",
                       param="max_tokens")
    deadline = time.monotonic() + state.settings.request_timeout
    return [Ask(prompted.encoded.input_ids, prompted.inputs, prompted.drawn, max_tokens=budget,
                temperature=chat.temperature, top_p=chat.top_p,
                seed=None if chat.seed is None else chat.seed + i, stop=chat.stop, logprobs=chat.logprobs, id=f"{rid}/{i}",
                image_tokens=prompted.image_positions,
                deadline=deadline) for i in range(chat.n)]


async def answer_chat(request: Request, state: "State"):
    settings, rid = state.settings, request.state.rid
    body = await read_body(request, settings)
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


async def _prepare(chat: ChatRequest, state: "State", rid: str):
    """The request's ``Ask``s; or, for an answer in text and pictures, (its sample, its prompt)."""
    model = state.engine.model
    with_pictures = check_modalities(chat.modalities, model.draws, model.generation.iterative)
    with tempfile.TemporaryDirectory(prefix="fusionlm-clips-") as folder:  # video parts, until encoded
        pictures = await _pictures(chat, state.settings, folder)
        sample = _sample(chat, pictures, rid)
        try:
            prompted = await asyncio.to_thread(state.prompts.sample, sample, generation_prompt=True)
        except FusionError as exc:  # too long for the context, a clip that is no clip…
            raise _prompt_error(exc, rid) from None
    if with_pictures:
        return sample, prompted
    return _asks(chat, prompted, state, rid)


def _prompt_error(exc: Exception, rid: str) -> ApiError:
    """A prompt that cannot be encoded (too long for the context, a clip that is no clip…) as a 400."""
    return ApiError(400, f"messages: {str(exc).replace(f'sample {rid}: ', '')}", param="messages")


async def _with_pictures(chat: ChatRequest, state: "State", rid: str, sample, prompted):
    """One answer in text and pictures (``converse.answer``), whole or as one streamed piece."""
    if chat.n != 1:
        raise ApiError(400, "n: an answer with pictures is written once (n: 1)", param="n")
    engine = state.engine
    fn = answering(engine.model, engine.tokenizer, state.prompts.spec, sample, max_tokens=chat.max_tokens or MAX_NEW_TOKENS,
                   temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed)
    text, written = await on_engine(state, fn)
    use = usage(len(prompted.encoded.input_ids), written, prompted.image_positions)
    if not chat.stream:
        return completion(f"chatcmpl-{rid}", state.name, [(text, "stop", None)], use)

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


async def _events(queue: asyncio.Queue, state: "State", last: list[float]):
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


async def _whole(request, chat, asks, events, state: "State", rid: str):
    async def one(queue):
        text, logprobs, done = [], [], None
        async for event in _events(queue, state, [0.0]):
            if isinstance(event, Delta):
                text.append(event.text)
                logprobs.extend(event.logprobs)
            else:
                done = event
        return "".join(text), done, logprobs

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
    failed = [d for _, d, _ in results if isinstance(d, Failed)]
    if failed:
        raise ApiError(500 if failed[0].internal else 400, failed[0].message)
    _observe(state, [d for _, d, _ in results])
    first = results[0][1]
    use = usage(first.prompt_tokens, sum(d.completion_tokens for _, d, _ in results), first.image_tokens)
    asked = chat.logprobs is not None
    return completion(f"chatcmpl-{rid}", state.name,
                      [(t, d.finish_reason, lp if asked else None) for t, d, lp in results], use)


async def _stream(request, chat, asks, events, state: "State", rid: str):
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
                logprobs = list(event.logprobs) if chat.logprobs is not None else None
                yield chunk(cid, state.name, created, i, {"content": event.text}, logprobs=logprobs)
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


def _observe(state: "State", done: list[Done]) -> None:
    for d in done:
        state.metrics.tokens.inc(d.completion_tokens)
        state.metrics.first_token.observe(d.first_token_s)
