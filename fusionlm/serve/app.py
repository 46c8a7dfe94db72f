"""The HTTP server: the routes, the API key, errors in OpenAI's envelope, request ids, and
``serve``, which runs it under uvicorn.

A request is admitted (or refused with 429 when the engine's rows and queue are full) before its
body is read past the size limit, before any picture is fetched or decoded; ``chat`` answers a
chat request from there, ``pictures`` a request to draw.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .chat import answer_chat, on_engine, read_body
from .pictures import drawing, parse_images
from .protocol import ApiError
from .state import Metrics, ServeSettings, State

log = logging.getLogger("fusionlm.serve")
PAGE = Path(__file__).with_name("page")


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

    app.add_middleware(RequestIds, metrics=state.metrics)

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
        return await answer_chat(request, state)

    @app.post("/v1/images/generations")
    async def images(request: Request):
        _check_key(request, settings)
        model = _admit(state)
        if not model.draws:
            raise ApiError(400, "this model does not draw (model.generation.kind: none)", param="model")
        asked = parse_images(await read_body(request, settings), model)
        state.preparing += 1
        try:
            return await on_engine(state, drawing(model, state.engine.tokenizer, state.prompts.spec, asked))
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


class RequestIds:
    """Each request's id (the client's ``x-request-id``, or a new one) in ``request.state.rid`` and
    in the response; each response counted by route and status; an unexpected fault answered 500
    in OpenAI's envelope, its traceback in the log only. A plain ASGI middleware, so that a
    route sees the client's disconnect as it happens."""

    ROUTES = ("/v1/chat/completions", "/v1/images/generations", "/v1/models")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = (given or secrets.token_hex(8))[:64]
        scope.setdefault("state", {})["rid"] = rid
        status = []

        async def with_id(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        except Exception:
            log.exception("request %s: internal error", rid)
            if not status:
                await _error(ApiError(500, "internal error"))(scope, receive, with_id)
        finally:
            route = scope["path"] if scope["path"] in self.ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0] if status else 499)).inc()


def _admit(state: State):
    """The model, if the server can take one more request now (else 503 while loading, 429 when full)."""
    if state.engine is None:
        raise ApiError(503, "the model is still loading" if not state.failed else "the model could not be loaded",
                       retry_after=5)
    if state.in_hand >= state.capacity:
        raise ApiError(429, f"busy: {state.in_hand} requests in hand, the limit is {state.capacity}", retry_after=1)
    return state.engine.model


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _check_key(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")


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


__all__ = ["create_app", "serve", "api_key_from_env"]
