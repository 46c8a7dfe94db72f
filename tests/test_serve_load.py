"""A bounded, poisoned load on a live server: 200 requests, 16 at a time, one in ten poisoned (bad
base64, an address that must be refused, a picture over the pixel limit, a client that stalls,
a picture URL on a loopback server that accepts the connection and never answers).

Afterwards every healthy request has the answer it gets alone, no response was a 5xx, each
poisoned one got its documented status, no connection went outside 127.0.0.0/8, no traceback
reached a response, and the server's resident memory grew by less than 200 MB after warm-up. An
internal fault injected on purpose is a 500 whose traceback stays in the server's log.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.generate import Request, generate
from fusionlm.serve import media
from fusionlm.serve.state import ServeSettings
from fusionlm.serve.media import MediaPolicy
from serve_live import Server, png_url

TOTAL, AT_ONCE = 200, 16
POISONS = ["bad_base64", "refused_address", "too_many_pixels", "stalled_body", "hanging_url"]
STATUS = {"bad_base64": 400, "refused_address": 400, "too_many_pixels": 400, "stalled_body": 408, "hanging_url": 422}


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.fixture()
def hanging():
    """A loopback server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/never.png"
    sock.close()


def body(question: str, url: str) -> dict:
    return {"max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}


def stalled(port: int) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 400\r\n\r\n{\"messages\": [")
        answer = s.recv(65536).decode(errors="replace")
    status = int(answer.split()[1])
    return status, answer.split("\r\n\r\n", 1)[-1]


def test_a_poisoned_load(checkpoint, world, hanging, monkeypatch):
    connected = []
    opened = media._open

    async def watched(ip, port, ssl_context, server_hostname):
        connected.append(ip)
        return await opened(ip, port, ssl_context, server_hostname)

    monkeypatch.setattr(media, "_open", watched)
    policy = MediaPolicy(allow_private=True, allowed_domains=("127.0.0.1",), total_timeout=1.0)
    live = Server(ServeSettings(checkpoint=str(checkpoint), slots=8, max_queue=64, max_pixels=1_000_000,
                                body_timeout=1.0, media=policy))
    try:
        state = live.app.state.fusionlm
        healthy = []
        for i in range(20):
            s = world.sample(["color", "shape", "count", "position"][i % 4], "test", i)
            healthy.append((s.messages[0]["content"], s.images[0]))
        from fusionlm.checkpoint import load_model

        model, tokenizer, config = load_model(checkpoint)
        alone = generate(model, tokenizer, [Request(q, [im]) for q, im in healthy], ImageSpec.for_model(model, config),
                         max_new_tokens=6)
        big = io.BytesIO()
        Image.new("RGB", (1500, 1500), "white").save(big, format="PNG")  # 2.25 M pixels in a few kB
        poison_url = {"bad_base64": "data:image/png;base64,%%%%", "refused_address": "http://169.254.169.254/x.png",
                      "too_many_pixels": "data:image/png;base64," + base64.b64encode(big.getvalue()).decode(),
                      "hanging_url": hanging}

        def one(k: int):
            if k % 10 == 5:
                kind = POISONS[(k // 10) % len(POISONS)]
                if kind == "stalled_body":
                    return kind, *stalled(live.port)
                status, _, got = live.post("/v1/chat/completions",
                                           json.dumps(body("what is it?", poison_url[kind])).encode())
                return kind, status, json.dumps(got)
            q, im = healthy[k % len(healthy)]
            status, _, got = live.post("/v1/chat/completions", json.dumps(body(q, png_url(im))).encode())
            return k % len(healthy), status, got

        with ThreadPoolExecutor(AT_ONCE) as pool:
            list(pool.map(one, range(20)))  # warm-up
            before = resident_mb()
            started = time.monotonic()
            results = list(pool.map(one, range(TOTAL)))
            took = time.monotonic() - started
        grown = resident_mb() - before
        statuses = [status for _, status, _ in results]
        assert not [s for s in statuses if s >= 500]
        for key, status, got in results:
            if isinstance(key, str):
                assert status == STATUS[key], (key, status, got)
                assert "Traceback" not in got and "%%%%" not in got
            else:
                assert status == 200 and got["choices"][0]["message"]["content"] == alone[key], (key, got)
        assert sum(isinstance(k, str) for k, _, _ in results) == TOTAL // 10
        assert connected and all(ipaddress.ip_address(ip).is_loopback for ip in connected)
        assert grown < 200, f"resident memory grew {grown:.0f} MB"
        assert state.engine.active == 0 and state.preparing == 0
        print(f"{TOTAL} requests in {took:.1f} s; resident memory {grown:+.0f} MB")
    finally:
        live.stop()


def test_an_internal_fault_is_a_500_whose_traceback_stays_in_the_log(checkpoint, caplog):
    live = Server(ServeSettings(checkpoint=str(checkpoint)))
    try:
        engine = live.app.state.fusionlm.engine
        real = engine._pick

        def broken(state, logits):
            raise RuntimeError("an injected fault")

        engine._pick = broken
        with caplog.at_level(logging.ERROR, logger="fusionlm.serve"):
            status, _, got = live.post("/v1/chat/completions",
                                       json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
        engine._pick = real
        assert status == 500 and got["error"]["message"] == "internal error"
        assert "injected" not in json.dumps(got)
        assert any(r.exc_info and "an injected fault" in str(r.exc_info[1]) for r in caplog.records)
        status, _, _ = live.post("/v1/chat/completions",
                                 json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode())
        assert status == 200  # the engine goes on
    finally:
        live.stop()
