"""OpenAI's chat-completions request and response shapes, read and written with messages that name
the field at fault (``messages[1].content[0].image_url``), and the error envelope
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_N = 8  # choices per request
MAX_STOPS = 4  # OpenAI's own limit
MAX_TOP_LOGPROBS = 20  # and its

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "server_busy_error", 500: "internal_error"}


class ApiError(Exception):
    """An answer other than 200, in OpenAI's envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Part:
    """A piece of a message's content: text, or a picture (or, ``video``, a clip) to fetch from ``url``."""

    text: str | None = None
    url: str | None = None
    param: str = ""
    video: bool = False


@dataclass
class ChatRequest:
    messages: list[tuple[str, list[Part]]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    pictures: list[Part] = field(default_factory=list)  # the image parts, in order
    modalities: Any = None  # ["text", "image"]: the answer may hold pictures (a model that draws)
    logprobs: int | None = None  # each token's log-probability and this many alternatives (top_logprobs)


def parse_chat(body: bytes, *, max_images: int) -> ChatRequest:
    """A request body -> a ``ChatRequest``; ``ApiError`` 400 (413: too many pictures) naming the field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc.__class__.__name__} at position "
                            f"{getattr(exc, 'pos', getattr(exc, 'start', 0))})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: a non-empty list of messages is required", param="messages")
    parsed = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    if parsed[-1][0] == "assistant":
        raise ApiError(400, "messages: the last message is the assistant's; there is nothing to answer",
                       param=f"messages[{len(parsed) - 1}].role")
    pictures = [p for _, parts in parsed for p in parts if p.url is not None]
    if len(pictures) > max_images:
        raise ApiError(413, f"messages: {len(pictures)} images, over the limit of {max_images} per request",
                       param="messages", code="too_many_images")
    stream_options = _get(data, "stream_options", dict, {}) or {}
    request = ChatRequest(
        messages=parsed, pictures=pictures,
        max_tokens=_tokens(data),
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, open_low=True),
        stop=_stops(data.get("stop")),
        seed=_get(data, "seed", int, None),
        n=_get(data, "n", int, 1),
        stream=bool(_get(data, "stream", bool, False)),
        include_usage=bool(_get(stream_options, "include_usage", bool, False, prefix="stream_options.")),
        model=_get(data, "model", str, None),
        modalities=data.get("modalities"),
        logprobs=_logprobs(data),
    )
    if not 1 <= request.n <= MAX_N:
        raise ApiError(400, f"n: must be between 1 and {MAX_N}, got {request.n}", param="n")
    return request


def _message(m: Any, where: str) -> tuple[str, list[Part]]:
    if not isinstance(m, dict):
        raise ApiError(400, f"{where}: a message must be an object", param=where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role: must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}",
                       param=f"{where}.role")
    content = m.get("content")
    if isinstance(content, str):
        return role, [Part(text=content, param=f"{where}.content")]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content: a string or a list of content parts", param=f"{where}.content")
    parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    if role != "user" and any(p.url is not None for p in parts):
        raise ApiError(400, f"{where}.content: images are read from user messages only", param=f"{where}.content")
    return role, parts


def _part(p: Any, where: str) -> Part:
    kind = p.get("type") if isinstance(p, dict) else None
    if kind == "text" and isinstance(p.get("text"), str):
        return Part(text=p["text"], param=where)
    if kind in ("image_url", "video_url"):  # video_url (vLLM's name): an animated GIF, WebP or PNG
        image = p.get(kind)
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{where}.{kind}.url: a URL string is required", param=f"{where}.{kind}")
        return Part(url=url, param=f"{where}.{kind}", video=kind == "video_url")
    raise ApiError(400, f"{where}: a content part is {{type: text, text}}, {{type: image_url, image_url: {{url}}}} "
                        f"or {{type: video_url, video_url: {{url}}}}", param=where)


def _get(data: dict, key: str, kind: type, default, *, prefix: str = ""):
    value = data.get(key, default)
    if value is None or value is default:
        return value
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"{prefix}{key}: must be {'an' if kind is int else 'a'} {kind.__name__}, got "
                            f"{type(value).__name__}", param=prefix + key)
    return value


def _number(data: dict, key: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key}: must be a number", param=key)
    if value > high or value < low or (open_low and value <= low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{key}: must be in {bound}, got {value}", param=key)
    return float(value)


def _logprobs(data: dict) -> int | None:
    """``top_logprobs`` (0 to 20) when ``logprobs`` is true; None when it is not asked."""
    asked = _get(data, "logprobs", bool, False)
    top = data.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise ApiError(400, f"top_logprobs: an integer from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if top is not None and not asked:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    return (top or 0) if asked else None


def _tokens(data: dict) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"{key}: must be a positive integer", param=key)
        return value
    return None


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: a non-empty string or a list of up to {MAX_STOPS}", param="stop")
    return tuple(stops)


# ----------------------------------------------------------------------------- responses


def usage(prompt: int, completion: int, images: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"image_tokens": images}}


def completion(rid: str, model: str, choices: list[tuple[str, str, list | None]], use: dict) -> dict[str, Any]:
    """A whole ``chat.completion``: ``choices`` are (text, finish_reason, logprobs entries or None)."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                         "logprobs": None if lp is None else {"content": lp}}
                        for i, (text, reason, lp) in enumerate(choices)],
            "usage": use}


def chunk(rid: str, model: str, created: int, index: int | None, delta: dict | None = None,
          finish_reason: str | None = None, use: dict | None = None, logprobs: list | None = None) -> str:
    """One server-sent event of a streamed ``chat.completion.chunk`` (no choice: the usage chunk)."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "finish_reason": finish_reason,
                                         "logprobs": None if logprobs is None else {"content": logprobs}}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body)}\n\n"
