"""A served model that draws: OpenAI's images API gives the pictures ``draw`` draws, and a chat
answer asked for ``modalities: ["text", "image"]`` holds its pictures as Markdown data URLs."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from fusionlm.draw import DrawRequest, Sampling, draw
from serve_live import Server
from test_serve import error_of

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def drawing_run(tmp_path_factory):
    from fusionlm.config import from_dict, validate
    from fusionlm.train.loop import train
    from helpers_train import stage, tiny_dict

    data = tiny_dict()
    data["model"].update(encoder={"kind": "none"}, connector={"kind": "none"}, fusion={"kind": "early"},
                         image_tokenizer={"kind": "palette", "image_size": 32, "downsample": 8, "codebook_size": 7},
                         generation={"kind": "shared", "cfg": 2.0})
    data["model"]["llm"]["init_std"] = 0.2
    data["stages"] = [stage("t2i", train=["llm"], mixture={"draw": 1, "color": 1}, steps=2, batch_size=4)]
    out = tmp_path_factory.mktemp("drawing") / "run"
    train(validate(from_dict(data)), out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def server(drawing_run):
    from fusionlm.serve.state import ServeSettings

    live = Server(ServeSettings(checkpoint=str(drawing_run), model_name="painter", slots=2))
    yield live
    live.stop()


def pictures_of(b64s: list[str]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in b64s]


def test_the_images_api_draws_what_draw_draws(server):
    state = server.app.state.fusionlm
    model, tokenizer = state.engine.model, state.engine.tokenizer
    out = server.client().images.generate(model="painter", prompt="two red squares", n=2, response_format="b64_json",
                                          extra_body={"seed": 5})
    got = pictures_of([d.b64_json for d in out.data])
    sampling = Sampling.of(model.config.generation)
    expected = draw(model, tokenizer, [DrawRequest("two red squares", seed=5 + i) for i in range(2)], sampling=sampling)
    assert [g.tobytes() for g in got] == [e.tobytes() for e in expected]
    assert got[0].size == (32, 32) and got[0].tobytes() != got[1].tobytes()  # each its own seed


def test_bad_drawing_requests_get_400_naming_the_field(server):
    for body, param in [({"prompt": ""}, "prompt"), ({"prompt": "x", "n": 99}, "n"), ({"prompt": "x", "size": "1024x1024"}, "size"),
                        ({"prompt": "x", "response_format": "url"}, "response_format"),
                        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"), ({"prompt": "x", "seed": "a"}, "seed")]:
        status, _, got = server.post("/v1/images/generations", json.dumps(body).encode())
        assert (status, got["error"]["param"]) == (400, param), got


def test_a_chat_answer_can_hold_a_picture(server):
    state = server.app.state.fusionlm
    model = state.engine.model
    begin = model.ids.begin_image

    def opening(module, args, out):  # the model opens a picture at once
        out = out.clone()
        out[..., begin] += 1e4
        return out

    handle = model.llm.get_output_embeddings().register_forward_hook(opening)
    try:
        out = server.client().chat.completions.create(
            model="painter", max_tokens=4, messages=[{"role": "user", "content": "draw a red circle"}],
            extra_body={"modalities": ["text", "image"], "seed": 3})
    finally:
        handle.remove()
    text = out.choices[0].message.content
    assert text.startswith("![image](data:image/png;base64,")
    (picture,) = pictures_of([text.split("base64,", 1)[1].split(")", 1)[0]])
    assert picture.size == (32, 32)
    assert out.usage.completion_tokens >= 18  # a picture's 18 positions, and any text


def test_a_model_that_only_reads_refuses_to_draw(checkpoint_reading):
    from fusionlm.serve.state import ServeSettings

    live = Server(ServeSettings(checkpoint=str(checkpoint_reading)))
    try:
        status, _, got = live.post("/v1/images/generations", json.dumps({"prompt": "a cat"}).encode())
        assert status == 400 and "does not draw" in got["error"]["message"]
        status, error = error_of(live, {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "image"]})
        assert (status, error["param"]) == (400, "modalities")
    finally:
        live.stop()


@pytest.fixture(scope="module")
def checkpoint_reading(tmp_path_factory, tokenizer):
    from conftest import tiny_config

    from fusionlm.checkpoint import build_model, save_model

    config = tiny_config("unified")
    return save_model(build_model(config, tokenizer).eval(), tokenizer, config, tmp_path_factory.mktemp("r") / "ck")


@pytest.mark.parametrize("kind", ["masked", "diffusion"])
def test_a_model_that_draws_in_passes_draws_over_the_images_api_and_refuses_a_picture_in_chat(tmp_path, kind):
    """A parallel design (masked codes, or denoised patches) over HTTP: the images API gives what
    ``draw`` draws; a chat answer holding a picture is refused with the reason and the route."""
    from fusionlm.checkpoint import save_model
    from fusionlm.serve.state import ServeSettings
    from test_diffusion import diffusion_dict
    from test_drawing import built, drawing_dict

    model, tokenizer, config = built(diffusion_dict() if kind == "diffusion" else drawing_dict("masked"))
    run = save_model(model.eval(), tokenizer, config, tmp_path / "ck")
    live = Server(ServeSettings(checkpoint=str(run), model_name="painter"))
    try:
        out = live.client().images.generate(model="painter", prompt="a red circle", n=1, response_format="b64_json",
                                            extra_body={"seed": 3})
        state = live.app.state.fusionlm
        served, served_tokenizer = state.engine.model, state.engine.tokenizer
        (expected,) = draw(served, served_tokenizer, [DrawRequest("a red circle", seed=3)],
                           sampling=Sampling.of(served.config.generation))
        assert pictures_of([out.data[0].b64_json])[0].tobytes() == expected.tobytes()
        status, error = error_of(live, {"messages": [{"role": "user", "content": "draw a cat"}],
                                        "modalities": ["text", "image"]})
        assert (status, error["param"]) == (400, "modalities") and "/v1/images/generations" in error["message"]
    finally:
        live.stop()
