"""The serving engine: continuous batching gives each request the tokens ``generate`` gives it alone.

Requests arrive while others decode (they join at step boundaries and leave when done), on a
random tiny model of each design; cross-attention designs are served one at a time on the
general path. Also: the feature cache skips the encoder for a picture seen before, a cancelled
request frees its row, stop strings and budgets end an answer.
"""

from __future__ import annotations

import threading
import time

import pytest

from fusionlm.data.prompt import PromptEncoder
from fusionlm.generate import Request, generate_ids
from fusionlm.serve.engine import Ask, Delta, Done, Engine, Failed


class Collect:
    """Events of several asks, by index; ``wait()`` until every one has ended."""

    def __init__(self, n: int):
        self.text = [[] for _ in range(n)]
        self.done: dict[int, object] = {}
        self.all = threading.Event()
        self.n = n

    def sink(self, i: int):
        def take(event):
            if isinstance(event, Delta):
                self.text[i].append(event.text)
            else:
                self.done[i] = event
                if len(self.done) == self.n:
                    self.all.set()
        return take

    def wait(self, timeout: float = 60.0):
        assert self.all.wait(timeout), f"only {len(self.done)} of {self.n} answers ended"
        return ["".join(t) for t in self.text], [self.done[i] for i in range(self.n)]


def requests(world, n: int = 6) -> list[Request]:
    tasks = ["color", "shape", "count", "caption", "position", "count"]
    out = []
    for i in range(n):
        s = world.sample(tasks[i % len(tasks)], "test", i)
        out.append(Request(s.messages[0]["content"], list(s.images)))
    out.append(Request("What is two plus two?"))
    return out


def asks_of(model, tokenizer, spec, reqs, **kw) -> list[Ask]:
    prompts = PromptEncoder.of(model, tokenizer, spec)
    out = []
    for i, r in enumerate(reqs):
        p = prompts.request(r)
        out.append(Ask(p.encoded.input_ids, p.inputs, p.drawn, id=str(i), image_tokens=p.image_positions, **kw))
    return out


def served(engine, asks, *, stagger: float = 0.0):
    got = Collect(len(asks))
    for i, ask in enumerate(asks):
        engine.submit(ask, got.sink(i))
        if stagger:
            time.sleep(stagger)
    return got.wait()


@pytest.mark.parametrize("fusion", ["unified", "fuyu", "cross_attention"])
def test_batched_answers_are_the_answers_alone(make_model, tokenizer, world, spec_for, no_end, fusion):
    model = make_model(fusion, init_std=0.2)
    no_end(model)  # every answer runs its whole budget: rows end at different steps only by their budgets
    spec = spec_for(model)
    reqs = requests(world)
    budgets = [3 + 2 * i for i in range(len(reqs))]  # rows leave at different steps; others take their place
    alone = [generate_ids(model, tokenizer, [r], spec, max_new_tokens=b)[0] for r, b in zip(reqs, budgets)]
    engine = Engine(model, tokenizer, slots=3).start()
    try:
        assert ("continuous batching" in engine.mode) == (fusion != "cross_attention")
        asks = asks_of(model, tokenizer, spec, reqs)
        for ask, b in zip(asks, budgets):
            ask.max_tokens = b
        texts, done = served(engine, asks, stagger=0.002)
    finally:
        engine.stop()
    expected = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in alone]
    assert texts == expected and len(set(expected)) > 3
    assert [d.completion_tokens for d in done] == budgets and all(d.finish_reason == "length" for d in done)
    assert done[0].image_tokens == model.tokens_per_image and done[-1].image_tokens == 0


def test_the_slot_decoder_gives_generates_tokens_while_rows_come_and_go(make_model, tokenizer, world, spec_for,
                                                                       no_end):
    """Token ids, not text: five prompts through three rows, each admitted when one frees."""
    from fusionlm.runtime import SlotDecoder

    model = make_model("unified", init_std=0.2)
    no_end(model)
    spec = spec_for(model)
    reqs = requests(world, 4)
    alone = [generate_ids(model, tokenizer, [r], spec, max_new_tokens=6)[0] for r in reqs]
    engine = Engine(model, tokenizer, slots=2)
    assert isinstance(engine.decoder, SlotDecoder)
    asks = asks_of(model, tokenizer, spec, reqs, max_tokens=6)
    got = Collect(len(asks))
    states = {}
    for i, ask in enumerate(asks):
        engine.submit(ask, got.sink(i))
    while len(got.done) < len(asks):  # the loop by hand: admit, step
        engine._admit(engine.slots)
        for s in engine.running:
            states[s.ask.id] = s
        engine._step()
    assert [states[str(i)].tokens for i in range(len(reqs))] == alone and len({tuple(t) for t in alone}) == len(alone)


def test_a_picture_seen_before_is_not_encoded_again(make_model, tokenizer, world, spec_for):
    model = make_model("unified", init_std=0.2)
    spec = spec_for(model)
    s = world.sample("color", "test", 0)
    first = Request(s.messages[0]["content"], list(s.images))
    again = Request("Describe the image. <image>", list(s.images))  # the same picture in another prompt
    calls = []
    handle = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    engine = Engine(model, tokenizer, slots=2).start()
    try:
        (a,), _ = served(engine, asks_of(model, tokenizer, spec, [first], max_tokens=4))
        (b,), _ = served(engine, asks_of(model, tokenizer, spec, [again], max_tokens=4))
    finally:
        engine.stop()
        handle.remove()
    assert len(calls) == 1 and (engine.cache.hits, engine.cache.misses) == (1, 1)
    assert b == tokenizer.decode(generate_ids(model, tokenizer, [again], spec, max_new_tokens=4)[0],
                                 skip_special_tokens=True).strip()


def test_cancelled_and_stopped_answers_free_their_rows(make_model, tokenizer, world, spec_for, no_end):
    model = make_model("unified", init_std=0.2)
    no_end(model)
    spec = spec_for(model)
    reqs = requests(world, 2)
    engine = Engine(model, tokenizer, slots=1).start()
    try:
        long, short = asks_of(model, tokenizer, spec, reqs[:2], max_tokens=100)
        short.max_tokens = 3
        got = Collect(2)
        engine.submit(long, got.sink(0))
        engine.submit(short, got.sink(1))  # waits: the one row is taken
        time.sleep(0.05)
        long.cancelled = True
        texts, done = got.wait()
        assert done[0].finish_reason == "cancelled" and done[0].completion_tokens < 100
        assert done[1].finish_reason == "length" and done[1].completion_tokens == 3
        # a stop string ends the answer before it, and is not sent
        sampled = dict(max_tokens=12, temperature=1.0, seed=3)  # varied text, the same twice
        (full,), _ = served(engine, asks_of(model, tokenizer, spec, reqs[:1], **sampled))
        middle = len(full) // 2
        stop = full[middle: middle + 3]
        (cut,), (d,) = served(engine, asks_of(model, tokenizer, spec, reqs[:1], stop=(stop,), **sampled))
        assert len(full) > 6 and d.finish_reason == "stop" and d.completion_tokens < 12
        assert cut == full[: full.find(stop)].strip()
        assert engine.active == 0 and engine.decoder.free == 1
    finally:
        engine.stop()


def test_a_prompt_that_fails_fails_alone(make_model, tokenizer, world, spec_for):
    model = make_model("unified", init_std=0.2)
    spec = spec_for(model)
    good = asks_of(model, tokenizer, spec, requests(world, 1)[:1], max_tokens=3)[0]
    bad = Ask([model.ids.image] * 3, [], max_tokens=3, id="bad")  # image tokens and no picture
    engine = Engine(model, tokenizer, slots=2).start()
    try:
        _, done = served(engine, [bad, good])
    finally:
        engine.stop()
    assert isinstance(done[0], Failed) and "no images" in done[0].message
    assert isinstance(done[1], Done) and done[1].completion_tokens >= 1


def test_an_early_fusion_model_is_served_with_its_pictures_as_codes(tmp_path, world):
    """A drawing model that reads pictures as codes answers in text as ``generate`` does."""
    from fusionlm.checkpoint import load_model
    from fusionlm.config import from_dict, validate
    from fusionlm.data.pixels.processing import ImageSpec
    from fusionlm.train.loop import train
    from helpers_train import stage, tiny_dict

    data = tiny_dict()
    data["model"].update(encoder={"kind": "none"}, connector={"kind": "none"}, fusion={"kind": "early"},
                         image_tokenizer={"kind": "palette", "image_size": 32, "downsample": 8, "codebook_size": 7},
                         generation={"kind": "shared"})
    data["model"]["llm"]["init_std"] = 0.2  # answers that differ from picture to picture
    data["stages"] = [stage("t2i", train=["llm"], mixture={"draw": 1, "color": 1}, steps=2, batch_size=4)]
    train(validate(from_dict(data)), tmp_path / "run", log=lambda *_: None)
    model, tokenizer, config = load_model(tmp_path / "run")
    spec = ImageSpec.for_model(model, config)
    reqs = requests(world, 3)
    alone = [generate_ids(model, tokenizer, [r], spec, max_new_tokens=5)[0] for r in reqs]
    engine = Engine(model, tokenizer, slots=2).start()
    try:
        texts, done = served(engine, asks_of(model, tokenizer, spec, reqs, max_tokens=5))
    finally:
        engine.stop()
    assert texts == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in alone]
    assert len(set(map(tuple, alone))) > 1, alone
    assert done[0].image_tokens == 18  # 4 x 4 codes of the palette, with the picture's begin and end
