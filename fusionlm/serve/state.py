"""What a server holds: its settings (``fusionlm serve``'s flags), the loaded model, its engine and
prompt encoder (``State``, loaded on a thread while the server already answers ``/ready``), and its
Prometheus metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..data.pixels.images import DEFAULT_MAX_PIXELS
from ..data.pixels.processing import ImageSpec
from ..data.prompt import PromptEncoder
from .engine import Engine
from .media import MediaPolicy

log = logging.getLogger("fusionlm.serve")


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
