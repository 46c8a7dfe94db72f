"""Serving: ``fusionlm serve`` against ``transformers serve`` on the same LLaVA checkpoint, the same
prompts and pictures, over HTTP, one server at a time.

The checkpoint is a random LLaVA (a 256-wide, 4-layer Llama, a SigLIP-shaped tower, 64-pixel
pictures in 8-pixel patches: 64 image tokens) written by transformers, with a chat template that
renders content parts; fusionlm serves its import. Each server runs alone, pinned to core 1 with
one thread (``taskset``, ``OMP_NUM_THREADS=1``); this load generator is pinned to core 0 and its
CPU use is reported. Greedy answers are checked equal first. Then, for 1, 4 and 16 concurrent
clients (closed loop) and for Poisson arrivals at two rates (open loop), every request streams:
requests/s, output tokens/s, time to first token and inter-token latency (median, p99).

    python benchmarks/serving.py [--requests 32] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import llava_pair, print_table

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEMPLATE = (  # content as a string (fusionlm's prompts) or as parts (transformers serve's): the same text
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] in ['image', 'image_url'] %}<image>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% else %}ASSISTANT: {% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QUESTIONS = ["What colour is the shape?", "What shape is it?", "How many shapes are there?", "Describe the picture."]


def pictures(n: int) -> list[str]:
    from fusionlm.data.world import World

    world = World(image_size=64, seed=0)
    urls = []
    for i in range(n):
        buf = io.BytesIO()
        world.sample("caption", "test", i).images[0].save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


class Running:
    """One server process, pinned to core 1, one thread."""

    def __init__(self, name: str, command: list[str], port: int):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.name, self.port = name, port
        self.log = open(Path(tempfile.mkdtemp()) / f"{name}.log", "w")
        self.proc = subprocess.Popen(["taskset", "-c", "1", *command], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (see {self.log.name})")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        """Ready for requests: ``/ready`` where the server has it (fusionlm: its model loaded), else ``/health``."""
        try:
            for path in ("/ready", "/health"):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", path)
                status = conn.getresponse().status
                if status != 404:
                    return status == 200
            return False
        except OSError:
            return False

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def chat(port: int, model: str, question: str, url: str, max_tokens: int, stream: bool):
    """One request: (answer, time to the first piece, the gaps between pieces); not streamed:
    (answer, the tokens it wrote, [])."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    if not stream:
        out = json.loads(response.read())
        return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"], []
    pieces, times = [], []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        text = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
        if text:
            pieces.append(text)
            times.append(time.perf_counter())
    first = (times[0] - started) if times else float("nan")
    return "".join(pieces), first, [b - a for a, b in zip(times, times[1:])]


def cache_hits(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("fusionlm_image_cache_hits "))


def closed_loop(port, model, work, clients: int):
    """``clients`` threads, each sending its next request when its last one is answered."""
    results, lock, queue = [], threading.Lock(), list(work)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                q, url = queue.pop()
            got = chat(port, model, q, url, ARGS.max_tokens, True)
            with lock:
                results.append((q, url, *got))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - started


def open_loop(port, model, work, rate: float):
    """Requests sent at Poisson arrival times of ``rate`` per second, whatever is still running."""
    rng = random.Random(0)
    results, lock, threads = [], threading.Lock(), []
    started = time.perf_counter()
    at = 0.0
    for q, url in work:
        at += rng.expovariate(rate)
        time.sleep(max(0.0, started + at - time.perf_counter()))

        def one(q=q, url=url):
            got = chat(port, model, q, url, ARGS.max_tokens, True)
            with lock:
                results.append((q, url, *got))

        threads.append(threading.Thread(target=one))
        threads[-1].start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - started


def summary(results, wall: float, written: dict) -> dict:
    """``written``: the tokens each (question, picture) is answered with (the server's own usage)."""
    tokens = sum(written[(q, url)] for q, url, *_ in results)
    firsts = sorted(f for *_, f, _ in results if f == f)
    gaps = sorted(g for *_, gs in results for g in gs)

    def p(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    return {"rps": len(results) / wall, "tps": tokens / wall, "ttft": (statistics.median(firsts) * 1000, p(firsts, .99)),
            "itl": (p(gaps, .5), p(gaps, .99))}


def main() -> None:
    os.sched_setaffinity(0, {0})
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    *_, src = llava_pair(init_std=0.2, chat_template=TEMPLATE)
    ours = src.parent / "ours"
    urls = pictures(8)
    work = [(QUESTIONS[i % len(QUESTIONS)], urls[i % len(urls)]) for i in range(ARGS.requests)]
    servers = {
        "fusionlm serve": (["fusionlm", "serve", "--checkpoint", str(ours), "--port", "8311", "--device", "cpu",
                            "--slots", "16", "--max-queue", "64", "--model-name", "llava"], 8311, "llava"),
        "transformers serve": (["transformers", "serve", str(src), "--device", "cpu", "--port", "8312",
                                "--host", "127.0.0.1"], 8312, str(src)),
    }
    fresh = pictures(16)[8:]  # pictures no other request shows
    answers, rows, figures, follow_up = {}, [], {}, {}
    for name, (command, port, model) in servers.items():
        command = [str(BIN / command[0]), *command[1:]]
        server = Running(name, command, port)
        try:
            whole = {(q, u): chat(port, model, q, u, ARGS.max_tokens, False) for q, u in dict.fromkeys(work)}
            answers[name] = [whole[w][0].strip() for w in dict.fromkeys(work)]
            written = {w: got[1] for w, got in whole.items()}
            chat(port, model, *work[0], ARGS.max_tokens, True)  # warm-up
            if name == "fusionlm serve":  # a picture seen before skips the encoder: time to first token, new vs again
                firsts = [[chat(port, model, "What shape is it?", u, 1, True)[1] for _ in range(2)] for u in fresh]
                follow_up = {"new": statistics.median(f[0] for f in firsts) * 1000,
                             "again": statistics.median(f[1] for f in firsts) * 1000, "hits": cache_hits(port)}
            for clients in (1, 4, 16):
                results, wall = closed_loop(port, model, work, clients)
                figures[(name, f"{clients} client{'s' * (clients > 1)}")] = summary(results, wall, written)
            for rate in ARGS.rates:
                results, wall = open_loop(port, model, work, rate)
                figures[(name, f"Poisson {rate:g}/s")] = summary(results, wall, written)
        finally:
            server.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    same = sum(a == b for a, b in zip(*answers.values()))
    print(f"checkpoint: random LLaVA, Llama 256 wide x 4 layers, 64 image tokens; {ARGS.requests} requests per "
          f"scenario, {ARGS.max_tokens} new tokens, greedy; servers on core 1, one thread each")
    print(f"greedy answers equal: {same} of {len(answers['fusionlm serve'])}")
    for scenario in dict.fromkeys(s for _, s in figures):
        ours_, theirs = figures[("fusionlm serve", scenario)], figures[("transformers serve", scenario)]
        for name, f in (("fusionlm serve", ours_), ("transformers serve", theirs)):
            rows.append(f"| {scenario} | {name} | {f['rps']:.2f} | {f['tps']:.1f} | {f['ttft'][0]:.0f} / {f['ttft'][1]:.0f} "
                        f"| {f['itl'][0]:.1f} / {f['itl'][1]:.1f} |")
        rows.append(f"| {scenario} | **ratio** | **{ours_['rps'] / theirs['rps']:.2f}×** | "
                    f"{ours_['tps'] / max(theirs['tps'], 1e-9):.2f}× | | |")
    print_table(["scenario", "server", "requests/s", "output tokens/s", "TTFT ms median / p99",
                 "inter-token ms median / p99"], "llrrrr", rows)
    single = figures[("fusionlm serve", "1 client")]["itl"][1]
    print(f"fusionlm serve's p99 inter-token latency at 16 clients: "
          f"{figures[('fusionlm serve', '16 clients')]['itl'][1] / single:.1f}x its single-client p99")
    print(f"fusionlm serve, a picture shown again (8 pictures, each asked twice, one token): time to first token "
          f"{follow_up['new']:.1f} ms the first time, {follow_up['again']:.1f} ms again; feature-cache hits "
          f"{follow_up['hits']:.0f}")
    used = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(f"load generator (core 0): {used:.1f} s of CPU in all")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 8.0])
    ARGS = parser.parse_args()
    main()
