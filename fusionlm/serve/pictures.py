"""Pictures a served model draws: OpenAI's images API (``POST /v1/images/generations``, answered in
``b64_json``) and chat answers in text and pictures (a request with ``modalities: ["text",
"image"]``), each picture written into the answer as a Markdown image with a ``data:`` URL.

Both run on the engine's thread between its steps (``Engine.call``): drawing decodes a batch of
its own through ``fusionlm.draw``, and an answer in text and pictures through ``fusionlm.converse``.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass

from PIL import Image

from ..converse import AnswerRequest, answer
from ..data.drawing import DrawLayout
from ..draw import DrawRequest, Sampling, draw
from .protocol import MAX_N, ApiError

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class ImagesRequest:
    prompt: str
    n: int = 1
    seed: int = 0
    sampling: Sampling = Sampling()


def parse_images(body: bytes, model) -> ImagesRequest:
    """An images-API body -> what to draw; ``ApiError`` 400 naming the field. ``size`` may only be
    the model's own (``WxH``); ``guidance_scale``, ``temperature`` and ``top_k`` (fusionlm's) default
    to the model's ``model.generation``."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt: a non-empty string is required", param="prompt")
    n = data.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n: must be an integer between 1 and {MAX_N}", param="n")
    side = model.image_tokenizer.config.image_size
    size = data.get("size")
    if size not in (None, "auto", f"{side}x{side}"):
        raise ApiError(400, f"size: this model draws {side}x{side} pictures only, not {str(size)[:20]!r}", param="size")
    if data.get("response_format", "b64_json") != "b64_json":
        raise ApiError(400, "response_format: only b64_json (pictures are not stored for URLs)", param="response_format")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ApiError(400, "seed: must be an integer", param="seed")
    given = {"cfg": data.get("guidance_scale"), "temperature": data.get("temperature"), "top_k": data.get("top_k")}
    for key, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ApiError(400, f"{'guidance_scale' if key == 'cfg' else key}: must be a number", param=key)
    sampling = Sampling.of(model.config.generation, **given)
    try:
        sampling.check()
    except Exception as exc:
        raise ApiError(400, str(exc), param="guidance_scale") from None
    return ImagesRequest(prompt.strip(), n, seed, sampling)


def png_base64(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def drawing(model, tokenizer, spec, request: ImagesRequest):
    """The engine call that draws ``request``: -> an images-API response body."""

    def run():
        asked = [DrawRequest(request.prompt, seed=request.seed + i) for i in range(request.n)]
        pictures = draw(model, tokenizer, asked, spec, sampling=request.sampling)
        return {"created": int(time.time()), "data": [{"b64_json": png_base64(p)} for p in pictures]}

    return run


def answering(model, tokenizer, spec, sample, *, max_tokens: int, temperature: float, top_p: float,
              seed: int | None, pictures: int = 1):
    """The engine call that answers ``sample`` (its last turn the question) in text and pictures:
    -> (content, positions written), each picture a Markdown ``data:`` image. The text's positions
    are its tokens encoded again, a picture's the positions it takes (``DrawLayout.tokens``)."""
    turns = sample.messages
    request = AnswerRequest(turns[-1]["content"], list(sample.images), history=list(turns[:-1]), seed=seed or 0)

    def run():
        (got,) = answer(model, tokenizer, [request], spec, max_new_tokens=max_tokens, max_pictures=pictures,
                        temperature=temperature, top_p=top_p, seed=seed or 0)
        parts = [p if isinstance(p, str) else f"\n![image](data:image/png;base64,{png_base64(p)})\n"
                 for p in got.parts]
        text = "".join(p for p in got.parts if isinstance(p, str))
        written = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + len(got.pictures) * positions
        return "".join(parts).strip(), written

    positions = len(DrawLayout.of(model).tokens())

    return run


def check_modalities(value, draws: bool, iterative: bool = False) -> bool:
    """Whether a chat request asks for pictures in its answer (``modalities``); ``iterative``: the
    model draws in parallel passes, which an answer in text and pictures does not do yet."""
    if value is None:
        return False
    if not isinstance(value, list) or not value or any(m not in MODALITIES for m in value):
        raise ApiError(400, f"modalities: a list of {', '.join(MODALITIES)}", param="modalities")
    if "image" in value and not draws:
        raise ApiError(400, "modalities: this model does not draw (model.generation.kind: none)", param="modalities")
    if "image" in value and iterative:
        raise ApiError(400, "modalities: this model draws pictures in parallel passes, on their own "
                       "(POST /v1/images/generations), not inside a chat answer", param="modalities")
    return "image" in value
