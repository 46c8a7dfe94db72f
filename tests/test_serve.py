"""``fusionlm serve`` over real HTTP on 127.0.0.1: the ``openai`` client against a live server.

Plain, streamed, multi-image and concurrent requests give the answers ``generate`` gives; bad
input gets its documented status in OpenAI's error envelope, with no traceback or payload in it.
Every connection here is to 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusionlm.data.pixels.processing import ImageBatch, ImageSpec
from fusionlm.generate import Request, generate
from fusionlm.serve.state import ServeSettings
from fusionlm.serve.media import MediaPolicy
from serve_live import Server, png_url

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(checkpoint):
    live = Server(ServeSettings(checkpoint=str(checkpoint), model_name="tiny", slots=4, max_queue=8))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    from fusionlm.checkpoint import load_model

    model, tokenizer, config = load_model(checkpoint)
    spec = ImageSpec.for_model(model, config)
    return lambda reqs, n: generate(model, tokenizer, reqs, spec, max_new_tokens=n)


def ask(world, i: int, task: str = "color"):
    s = world.sample(task, "test", i)
    return s.messages[0]["content"], s.images[0]


def content(text: str, images) -> list[dict]:
    return [*({"type": "image_url", "image_url": {"url": png_url(im)}} for im in images), {"type": "text", "text": text}]


def test_models_health_ready_and_metrics(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(server.url + "/ready") as r:
        assert json.loads(r.read())["mode"].startswith("continuous batching")
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    for name in ("fusionlm_requests_total", "fusionlm_queue_length", "fusionlm_running_batch_size",
                 "fusionlm_time_to_first_token_seconds", "fusionlm_inter_token_latency_seconds",
                 "fusionlm_generated_tokens_total", "fusionlm_image_cache_hits"):
        assert name in text


def test_a_chat_answer_is_generates(server, reference, world):
    question, image = ask(world, 0)
    out = server.client().chat.completions.create(
        model="tiny", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": content(question, [image])}])  # the question's <image> is the part's
    (expected,) = reference([Request(question, [image])], 8)
    assert out.choices[0].message.content == expected and expected
    assert out.usage.prompt_tokens > out.usage.prompt_tokens_details.image_tokens == 16
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length")


def test_a_streamed_answer_is_the_same_answer(server, world):
    question, image = ask(world, 1)
    messages = [{"role": "user", "content": content(question, [image])}]
    client = server.client()
    whole = client.chat.completions.create(model="tiny", max_tokens=10, temperature=0, messages=messages)
    chunks = list(client.chat.completions.create(model="tiny", max_tokens=10, temperature=0, messages=messages,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_multi_image_requests_each_get_their_answer_alone(server, reference, world):
    """Twelve requests at once, one to three pictures each, through four rows."""
    reqs = []
    for i in range(12):
        images = [ask(world, i + k, "shape")[1] for k in range(1 + i % 3)]
        reqs.append(("<image>" * len(images) + "What shapes are there?", images))
    expected = reference([Request(q, ims) for q, ims in reqs], 6)
    client = server.client()

    def one(r):
        q, ims = r
        out = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                             messages=[{"role": "user", "content": content(q.replace("<image>", ""), ims)}])
        return out.choices[0].message.content

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, reqs))
    assert got == expected and len(set(expected)) > 6


def test_a_follow_up_turn_with_the_same_picture_hits_the_cache(server, world):
    question, image = ask(world, 7)
    state = server.app.state.fusionlm
    client = server.client()
    first = [{"role": "user", "content": content(question, [image])}]
    answer = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=first)
    hits = state.engine.cache.hits
    follow = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "And its shape?"}]
    client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=follow)
    assert state.engine.cache.hits == hits + 1


def error_of(server, body, headers=None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, got = server.post("/v1/chat/completions", raw, headers)
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in got["error"]["message"]
    return status, got["error"]


def test_bad_requests_get_400_naming_the_field(server, world):
    question, image = ask(world, 0)
    good = {"model": "tiny", "messages": [{"role": "user", "content": content(question, [image])}]}
    cases = [
        (b"{not json", 400, None),
        ({"model": "tiny"}, 400, "messages"),
        ({**good, "temperature": 3}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "n": 99}, 400, "n"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_tokens": 100000}, 400, "max_tokens"),
        ({**good, "stop": ["a"] * 5}, 400, "stop"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "hi " * 400}]}, 400, "messages"),  # over the context
    ]
    for body, status, param in cases:
        got_status, error = error_of(server, body)
        assert (got_status, error["param"]) == (status, param), (body if isinstance(body, bytes) else param, error)
    status, error = error_of(server, {**good, "max_tokens": 100000})
    assert "context" in error["message"] and "128" in error["message"]


def test_bad_media_is_refused_without_its_payload(server, world):
    payload = base64.b64encode(b"\x89PNG this is not a picture at all" * 20).decode()
    cases = [
        ("data:image/png;base64,@@@not-base64@@@", 400),
        ("data:text/html;base64," + payload, 400),
        ("data:image/png;base64," + payload, 400),  # decodes, but is no picture
        ("http://169.254.169.254/latest/meta-data/", 400),
        ("http://127.0.0.1:9/x.png", 400),
        ("http://10.0.0.1/x.png", 400),
        ("file:///etc/passwd", 400),
        ("gopher://example.com/", 400),
    ]
    for url, status in cases:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what is it?"}]}]}
        started = time.monotonic()
        got, error = error_of(server, body)
        assert got == status, (url, error)
        assert error["param"] == "messages[0].content[0].image_url"
        assert payload[:40] not in error["message"] and time.monotonic() - started < 5
    many = {"messages": [{"role": "user", "content": content("x", [ask(world, 0)[1]] * 9)}]}
    assert error_of(server, many)[0] == 413


def test_an_oversized_or_slow_body_is_refused(checkpoint):
    live = Server(ServeSettings(checkpoint=str(checkpoint), max_body_bytes=10_000, body_timeout=0.5))
    try:
        status, error = error_of(live, json.dumps({"messages": [{"role": "user", "content": "x" * 20_000}]}).encode())
        assert status == 413
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:  # a client trickling its body
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500\r\n\r\n{\"messages\"")
            started = time.monotonic()
            answer = s.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and time.monotonic() - started < 5
    finally:
        live.stop()


def test_an_api_key_is_checked_on_every_v1_route(checkpoint):
    live = Server(ServeSettings(checkpoint=str(checkpoint), api_key="sesame"))
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert live.client(api_key="sesame").models.list().data[0].id == "tiny"
        with urllib.request.urlopen(live.url + "/health") as r:  # health and metrics stay open
            assert r.status == 200
    finally:
        live.stop()


def test_a_full_server_says_429_at_once_before_fetching(checkpoint):
    """One row, no queue: while a request waits on a picture that never comes, the next is refused
    at once; the waiting one gets 422 when its fetch times out."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen()
    media = MediaPolicy(allow_private=True, total_timeout=1.5)
    live = Server(ServeSettings(checkpoint=str(checkpoint), slots=1, max_queue=0, media=media))
    try:
        url = f"http://127.0.0.1:{hang.getsockname()[1]}/never.png"
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(error_of, live, body)
            time.sleep(0.5)
            started = time.monotonic()
            status, error = error_of(live, {"messages": [{"role": "user", "content": "hi"}]})
            assert status == 429 and time.monotonic() - started < 1
            status, _, _ = live.post("/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": "hi"}]}).encode())
            assert status == 429
            assert waiting.result(timeout=10)[0] == 422
        status, _, _ = live.post("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode())
        assert status == 200  # the row is free again
    finally:
        live.stop()
        hang.close()


def test_a_stream_in_flight_finishes_when_the_server_shuts_down(checkpoint):
    live = Server(ServeSettings(checkpoint=str(checkpoint)))
    body = json.dumps({"messages": [{"role": "user", "content": "Describe it all."}], "max_tokens": 100,
                       "stream": True}).encode()
    req = urllib.request.Request(live.url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        first = r.readline()
        live.server.should_exit = True  # as on SIGTERM: stop taking connections, finish those in hand
        rest = r.read().decode()
    live.thread.join(30)
    assert first.startswith(b"data: ") and rest.rstrip().endswith("data: [DONE]")
    assert not live.thread.is_alive()


def test_logprobs_are_the_models_own_whole_and_streamed(server, checkpoint, world):
    import math

    import torch

    from fusionlm.checkpoint import load_model
    from fusionlm.data.prompt import PromptEncoder
    from fusionlm.generate import never_written

    question, image = ask(world, 2)
    messages = [{"role": "user", "content": content(question, [image])}]
    client = server.client()
    whole = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0, messages=messages,
                                           logprobs=True, top_logprobs=3)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    for e in entries:  # greedy: the token written is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6
    model, tokenizer, config = load_model(checkpoint)
    prompted = PromptEncoder.of(model, tokenizer, ImageSpec.for_model(model, config)).request(Request(question, [image]))
    with torch.no_grad():
        logits = model(torch.tensor([prompted.encoded.input_ids]),
                       pixel_values=ImageBatch.collate(prompted.inputs)).logits[0, -1]  # (V,)
    logits[never_written(model)] = float("-inf")
    assert abs(torch.log_softmax(logits, -1).max().item() - entries[0].logprob) < 1e-4
    streamed = list(client.chat.completions.create(model="tiny", max_tokens=5, temperature=0, messages=messages,
                                                   logprobs=True, top_logprobs=3, stream=True))
    pieces = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in entries]
    status, error = error_of(server, {"messages": messages, "top_logprobs": 3})
    assert (status, error["param"]) == (400, "top_logprobs")


def test_a_video_part_is_read_as_generate_reads_the_clip(tmp_path, tokenizer, world):
    """``video_url`` (vLLM's part): an animated GIF, its frames sampled by the one video loader."""
    import torch
    from conftest import tiny_config

    from fusionlm.checkpoint import build_model, load_model, save_model
    from fusionlm.data.pixels.video import Video

    config = tiny_config("unified")
    config.model.video.frames, config.model.llm.init_std = 2, 0.2  # a clip: two frames of 16 positions
    torch.manual_seed(0)
    path = save_model(build_model(config, tokenizer).eval(), tokenizer, config, tmp_path / "ck")
    frames = [world.sample("color", "test", i).images[0] for i in range(3)]
    clip = tmp_path / "clip.gif"
    frames[0].save(clip, save_all=True, append_images=frames[1:], duration=100, loop=0)
    url = "data:image/gif;base64," + base64.b64encode(clip.read_bytes()).decode()
    model, tok, cfg = load_model(path)
    (expected,) = generate(model, tok, [Request("<video>What happens?", [Video(str(clip))])],
                           ImageSpec.for_model(model, cfg), max_new_tokens=6)
    live = Server(ServeSettings(checkpoint=str(path)))
    try:
        part = {"type": "video_url", "video_url": {"url": url}}
        out = live.client().chat.completions.create(
            model="ck", max_tokens=6, temperature=0,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}])
        assert out.choices[0].message.content == expected and expected
        assert out.usage.prompt_tokens_details.image_tokens == 32
        still = {"type": "video_url", "video_url": {"url": png_url(frames[0])}}  # one frame: a picture, not a clip
        status, error = error_of(live, {"messages": [{"role": "user", "content": [still]}]})
        assert status == 400 and "frame" in error["message"], error
    finally:
        live.stop()


def test_a_client_that_goes_away_frees_its_row_and_its_fetch(checkpoint):
    """Mid-stream, and while its picture is still being fetched: the request is dropped at once."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen()
    media = MediaPolicy(allow_private=True, total_timeout=30)
    live = Server(ServeSettings(checkpoint=str(checkpoint), slots=2, media=media))
    state = live.app.state.fusionlm
    try:
        def gone(body: dict, wait_for) -> float:
            raw = json.dumps(body).encode()
            s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
            deadline = time.monotonic() + 10
            while not wait_for():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            s.close()  # the client goes away
            started = time.monotonic()
            while state.in_hand:
                assert time.monotonic() - started < 5, f"not dropped: {state.preparing} preparing, {state.engine.active} decoding"
                time.sleep(0.02)
            return time.monotonic() - started

        stream = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 100,
                  "stream": True, "temperature": 1.0}
        assert gone(stream, lambda: state.engine.active == 1) < 5
        url = f"http://127.0.0.1:{hang.getsockname()[1]}/never.png"
        fetching = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        assert gone(fetching, lambda: state.preparing == 1) < 5  # long before the 30 s fetch timeout
        assert state.engine.decoder.free == 2
    finally:
        live.stop()
        hang.close()
