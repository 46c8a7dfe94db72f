"""The lmms-eval adapter (fusionlm.evaluate.lmms) on tiny overfit checkpoints.

Most tests need no lmms-eval: the adapter's logic (request conversion, batched generation with
stop strings, log-likelihoods, multi-round) lives in plain functions and ``FusionLMAdapter``,
driven here by stand-in requests that have lmms-eval's ``args`` tuples. The tests at the end use
lmms-eval itself (skipped when it is not installed): its registry, its ``Instance`` objects and
a whole ``simple_evaluate`` run on a local task (a JSON file and PNGs written by the test).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import FUSIONS, make_batch, overfit, tiny_config
from fusionlm.checkpoint import build_model, save_model
from fusionlm.data.chat import encode
from fusionlm.data.pixels.video import Video
from fusionlm.errors import SampleError
from fusionlm.evaluate.lmms import (
    FusionLMAdapter,
    GenSettings,
    continuation_score,
    cut_at_stops,
    generation_settings,
    to_request,
)
from fusionlm.generate import MAX_NEW_TOKENS, Request, generate, generate_ids

TRAIN = [("color", 0), ("price", 0), ("shape", 1), ("count", 2)]
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


def req(*args):
    """A stand-in for lmms-eval's ``Instance``: the adapter reads only ``args``."""
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def checkpoints(tokenizer, world, one_thread, tmp_path_factory) -> dict[str, Path]:
    """Per design, a tiny model overfit for 60 steps on 4 samples (so it answers with real
    tokens), saved as a checkpoint."""
    out = {}
    for fusion in FUSIONS:
        torch.manual_seed(0)
        config = tiny_config(fusion)
        model = build_model(config, tokenizer)
        losses = overfit(model, make_batch(model, tokenizer, [world.sample(t, "train", i) for t, i in TRAIN]), steps=60)
        assert losses[-1] < 0.5 * losses[0]
        out[fusion] = save_model(model, tokenizer, config, tmp_path_factory.mktemp(fusion) / "ckpt")
    return out


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict[str, FusionLMAdapter]:
    """Per design, the adapter as lmms-eval builds it: from the checkpoint path."""
    return {fusion: FusionLMAdapter(pretrained=str(path), device="cpu") for fusion, path in checkpoints.items()}


def with_batch(adapter: FusionLMAdapter, batch_size: int, **kw) -> FusionLMAdapter:
    """Another adapter over the same loaded model, with the same documents."""
    other = FusionLMAdapter(model=adapter.model, tokenizer=adapter.tokenizer, config=adapter.config,
                            batch_size=batch_size, **kw)
    other.task_dict = adapter.task_dict
    return other


@pytest.fixture(scope="module")
def docs(world) -> list[dict]:
    """Documents of a toy task: a question and its images (1, 2, 0 and 1 of them)."""
    out = []
    for task, i in [("color", 0), ("price", 0), ("shape", 1), ("count", 2)]:
        s = world.sample(task, "train", i)
        question = s.messages[0]["content"].split("\n")[-1]
        out.append({"question": question, "images": list(s.images), "answer": s.answers[0]})
    out[2]["images"] = []  # a text-only document
    return out


def doc_to_visual(doc):
    return doc["images"]


def gen_requests(docs, contexts=None, gen_kwargs=None):
    contexts = contexts or [d["question"] for d in docs]
    return [req(c, dict(gen_kwargs or {"max_new_tokens": 8}), doc_to_visual, i, "toy", "test")
            for i, c in enumerate(contexts)]


# ------------------------------------------------------------------ plain functions


def test_to_request_places_images(world):
    red, blue = world.sample("color", "train", 0).images[0], world.sample("color", "train", 1).images[0]
    # No placeholder in the context: images first, one a line (as fusionlm trains).
    r = to_request("What colour?", [red, blue], id="a")
    assert r.prompt == "<image>\n<image>\nWhat colour?" and r.images == [red, blue] and r.id == "a"
    # Placeholders matching the visuals stay where the task put them (interleaved).
    r = to_request("Left: <image> right: <image> same colour?", [[red], [blue]])
    assert r.prompt == "Left: <image> right: <image> same colour?" and r.images == [red, blue]
    assert to_request("Left: <image> right: <image>", [red, blue], image_placement="first").prompt == \
        "<image>\n<image>\nLeft:  right:"
    # Placeholders that don't match: dropped, images first. MMMU's "<image 1>" is plain text.
    assert to_request("<image> What is in <image 1>?", [red, blue]).prompt == "<image>\n<image>\nWhat is in <image 1>?"
    assert to_request("<image>\nNo image here", None).prompt == "No image here"
    assert to_request("", []).prompt == ""
    # Paths: an image path stays a path; a folder or a video file is a Video.
    r = to_request("?", ["a.png", "clip.mp4", str(Path(__file__).parent)])
    assert r.images[0] == "a.png" and isinstance(r.images[1], Video) and isinstance(r.images[2], Video)
    assert r.prompt == "<image>\n<video>\n<video>\n?"
    with pytest.raises(SampleError, match="audio"):
        to_request("?", [{"array": [0.0], "sampling_rate": 16000}])
    with pytest.raises(SampleError, match="int"):
        to_request("?", [3])


def test_generation_settings():
    s, stops = generation_settings({"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n\n", ""]})
    assert s == GenSettings(16, 0.0, 1.0) and stops == ["\n\n"]
    s, stops = generation_settings({"until": "ASSISTANT:", "top_p": None}, default_max_new_tokens=32)
    assert s == GenSettings(32, 0.0, 1.0) and stops == ["ASSISTANT:"]
    n = MAX_NEW_TOKENS  # the default, as for fusionlm's own generate and eval
    assert generation_settings({"temperature": 0.7, "top_p": 0.9})[0] == GenSettings(n, 0.7, 0.9)
    assert generation_settings({"temperature": 0.7, "do_sample": False})[0] == GenSettings(n, 0.0, 1.0)
    assert generation_settings({"do_sample": True})[0] == GenSettings(n, 1.0, 1.0)
    assert generation_settings(None) == (GenSettings(n), [])


def test_cut_at_stops():
    assert cut_at_stops("red. It is\n\nQ: next", ["\n\n", "Q:"]) == "red. It is"
    assert cut_at_stops("red. It is\n\nQ: next", ["Q:", "."]) == "red"  # the earliest, whatever the order
    assert cut_at_stops("red", ["blue", ""]) == "red"
    assert cut_at_stops("red", []) == "red"


def test_continuation_score():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    targets = torch.tensor([0, 1, 2])
    logp = torch.log_softmax(logits, -1)
    total, greedy = continuation_score(logits, targets)
    assert total == pytest.approx(float(logp[0, 0] + logp[1, 1] + logp[2, 2]))
    assert greedy is False  # row 2's argmax is 0
    assert continuation_score(logits[:2], targets[:2]) == (pytest.approx(float(logp[0, 0] + logp[1, 1])), True)
    # A token generate never emits (the image token) is left out of the greedy argmax only.
    total, greedy = continuation_score(logits[2:], torch.tensor([2]), never=torch.tensor([0]))
    assert greedy is True and total == pytest.approx(float(logp[2, 2]))
    assert continuation_score(logits[:0], targets[:0]) == (0.0, True)


def test_adapter_arguments(checkpoints, tmp_path):
    path = checkpoints["unified"]
    # lmms-eval's CLI always sends batch_size (default 1) besides --model_args: the model args win.
    a = FusionLMAdapter.create_from_arg_string(f"pretrained={path},device=cpu,batch_size=8,image_placement=first",
                                               {"batch_size": 1, "max_batch_size": None, "device": None})
    assert a.batch_size == 8 and a.device == torch.device("cpu") and a.image_placement == "first"
    assert FusionLMAdapter.create_from_arg_string(f"pretrained={path}", {"batch_size": "3"}).batch_size == 3
    assert FusionLMAdapter(pretrained=path, batch_size="auto", max_batch_size=4).batch_size == 4
    assert a.max_new_tokens == MAX_NEW_TOKENS  # one default, fusionlm's
    with pytest.raises(TypeError, match="unknown model argument.*pretrain\\b"):
        FusionLMAdapter.create_from_arg_string(f"pretrain={path}")
    with pytest.raises(TypeError, match="pretrained=PATH"):
        FusionLMAdapter()
    with pytest.raises(ValueError, match="image_placement"):
        FusionLMAdapter(pretrained=path, image_placement="last")


@pytest.mark.skipif(HAS_LMMS, reason="lmms-eval is installed")
def test_module_imports_without_lmms_eval():
    import fusionlm.evaluate.lmms as mod

    with pytest.raises(ImportError, match=r"pip install 'fusionlm\[lmms\]'"):
        mod.FusionLMEval  # noqa: B018


# ------------------------------------------------------------------ generate_until


@pytest.mark.parametrize("fusion", FUSIONS)
def test_generate_until_equals_fusionlm_generate(fusion, loaded, docs):
    adapter = loaded[fusion]
    adapter.task_dict = {"toy": {"test": docs}}
    contexts = [d["question"] for d in docs]
    contexts[1] = "First: <image>\nSecond: <image>\n" + contexts[1]  # interleaved, kept in place
    requests = gen_requests(docs, contexts)
    model, tok, spec = adapter.model, adapter.tokenizer, adapter.spec
    expected = []
    for c, d in zip(contexts, docs):
        prompt = c if "<image>" in c else "".join("<image>\n" for _ in d["images"]) + c
        expected.append(generate(model, tok, [Request(prompt, d["images"])], spec, max_new_tokens=8)[0])
    assert adapter.generate_until(requests) == expected
    assert all(expected[i] for i in (0, 1, 3)), expected  # trained prompts give real answers
    for batch_size in (2, 3, 8):
        assert with_batch(adapter, batch_size).generate_until(requests) == expected


def test_generate_until_applies_settings_and_stops(loaded, docs, no_end):
    adapter = with_batch(loaded["unified"], 3)
    adapter.task_dict = {"toy": {"test": docs}}
    no_end(adapter.model)
    full = adapter.generate_until(gen_requests(docs, gen_kwargs={"max_new_tokens": 10}))
    assert all(len(adapter.tokenizer(t)["input_ids"]) >= 6 for t in full), full
    short = adapter.generate_until(gen_requests(docs, gen_kwargs={"max_new_tokens": 3}))
    assert short != full and all(f.startswith(s) for s, f in zip(short, full))
    # A stop string taken from inside each answer cuts it there; the batch keeps its order.
    stops = [t[len(t) // 2: len(t) // 2 + 2] for t in full]
    requests = [req(r.args[0], {"max_new_tokens": 10, "until": [stop, "\u2603"]}, *r.args[2:])
                for r, stop in zip(gen_requests(docs), stops)]
    cut = adapter.generate_until(requests)
    assert cut == [t[: t.find(s)] for t, s in zip(full, stops)]
    assert all(len(c) < len(t) for c, t in zip(cut, full))
    # Requests with different settings in one call: each gets its own.
    mixed = gen_requests(docs[:2], gen_kwargs={"max_new_tokens": 10}) + \
        [req(r.args[0], {"max_new_tokens": 3}, *r.args[2:]) for r in gen_requests(docs)[2:]]
    assert adapter.generate_until(mixed) == full[:2] + short[2:]


def test_refused_requests(loaded, docs):
    adapter = with_batch(loaded["unified"], 4)
    adapter.task_dict = {"toy": {"test": docs}}
    long = "colour " * 200  # past the 128-token context
    requests = gen_requests(docs, [docs[0]["question"], long, docs[2]["question"], docs[3]["question"]])
    out = adapter.generate_until(requests)
    assert out[1] == "" and adapter.failures == ["toy/test/1"]
    assert out[0] == adapter.generate_until(requests[:1])[0]  # the others are answered as usual
    ll = adapter.loglikelihood([req(long, " red", doc_to_visual, 0, "toy", "test"),
                                req("What colour?", " red", doc_to_visual, 0, "toy", "test")])
    assert ll[0] == (-math.inf, False) and math.isfinite(ll[1][0])
    strict = with_batch(loaded["unified"], 4, strict=True)
    with pytest.raises(SampleError, match="over the context"):
        strict.generate_until(requests)


def test_works_under_lmms_evals_truncated_images_setting(loaded, docs, monkeypatch):
    """lmms-eval sets Pillow's LOAD_TRUNCATED_IMAGES for the whole process, which fusionlm's
    image loader refuses: the adapter turns it off around fusionlm's image processing only."""
    from PIL import ImageFile

    adapter = loaded["unified"]
    adapter.task_dict = {"toy": {"test": docs}}
    want = adapter.generate_until(gen_requests(docs[:1]))
    want_ll = adapter.loglikelihood([req(docs[0]["question"], "red", doc_to_visual, 0, "toy", "test")])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    seen = []
    adapter.task_dict = {"toy": {"test": docs}}
    visual = lambda doc: seen.append(ImageFile.LOAD_TRUNCATED_IMAGES) or doc["images"]  # noqa: E731
    assert adapter.generate_until([req(docs[0]["question"], {"max_new_tokens": 8}, visual, 0, "toy", "test")]) == want
    assert adapter.loglikelihood([req(docs[0]["question"], "red", visual, 0, "toy", "test")]) == want_ll
    assert seen == [True, True] and ImageFile.LOAD_TRUNCATED_IMAGES is True  # the tasks' setting is left alone


# ------------------------------------------------------------------ loglikelihood


def direct_loglikelihood(adapter, prompt: str, images: list, continuation: str) -> tuple[float, bool]:
    """The sum of log-softmax of the model's logits at the continuation's positions, and whether
    each continuation token is the argmax there: one unbatched forward pass."""
    model, tok, spec = adapter.model, adapter.tokenizer, adapter.spec
    per_image = [spec.process_all(img) for img in images]
    sample = Request(prompt, images).sample()
    enc = encode(sample, tok, [model.layout.image_tokens(p) for p in per_image], max_length=128,
                 end_token=model.config.tokenizer.end_token, add_generation_prompt=True)
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([enc.input_ids + cont])
    from fusionlm.data.pixels.processing import ImageBatch

    pixels = ImageBatch.collate([inp for inputs in per_image for inp in inputs])
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits[0]
    n = len(enc.input_ids)
    rows = logits[n - 1: n - 1 + len(cont)]
    logp = torch.log_softmax(rows.float(), -1)
    total = sum(float(logp[i, t]) for i, t in enumerate(cont))
    return total, all(int(rows[i].argmax()) == t for i, t in enumerate(cont))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_loglikelihood_equals_direct_forward(fusion, loaded, docs):
    adapter = loaded[fusion]
    adapter.task_dict = {"toy": {"test": docs}}
    model, tok = adapter.model, adapter.tokenizer
    # The model's own greedy answer to doc 0, as text: its log-likelihood is greedy.
    first = Request("<image>\n" + docs[0]["question"], docs[0]["images"])
    answer_ids = generate_ids(model, tok, [first], adapter.spec, max_new_tokens=6)[0]
    answer = tok.decode(answer_ids)
    assert tok(answer, add_special_tokens=False)["input_ids"] == answer_ids  # round-trips
    cases = [(0, answer), (0, " blue square"), (1, docs[1]["answer"]), (2, "red"), (3, docs[3]["answer"]),
             (3, "")]
    requests = [req(docs[i]["question"], c, doc_to_visual, i, "toy", "test") for i, c in cases]
    requests.append(req("", "red"))  # lmms-eval's unconditional requests have just (context, continuation)
    # lmms-eval's doc_to_target: a function of the document
    requests.append(req(docs[0]["question"], lambda doc: doc["answer"], doc_to_visual, 0, "toy", "test"))
    got = adapter.loglikelihood(requests)
    expected = [direct_loglikelihood(adapter, "".join("<image>\n" for _ in docs[i]["images"]) + docs[i]["question"],
                                     docs[i]["images"], c) for i, c in cases]
    expected.append(direct_loglikelihood(adapter, "", [], "red"))
    expected.append(direct_loglikelihood(adapter, "<image>\n" + docs[0]["question"], docs[0]["images"],
                                         docs[0]["answer"]))
    assert len(got) == len(expected)
    for (lp, greedy), (want_lp, want_greedy) in zip(got, expected):
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    assert got[0][1] is True and got[0][0] < 0
    assert got[5] == (0.0, True)  # an empty continuation
    for batch_size in (2, 8):
        batched = with_batch(adapter, batch_size).loglikelihood(requests)
        assert [g for _, g in batched] == [g for _, g in got]
        assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in got], abs=1e-4)


# ------------------------------------------------------------------ generate_until_multi_round


def test_generate_until_multi_round(loaded, docs):
    adapter = with_batch(loaded["unified"], 2)
    adapter.task_dict = {"toy": {"test": docs}}
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        """Round 1 asks again with the first answer quoted; round 2 ends (docs with images only
        get round 1)."""
        calls.append((doc["question"], list(previous_output), round_idx, previous_round_info))
        if round_idx == 1 and doc["images"]:
            return doc["images"], f"You said {previous_output[-1]}. {doc['question']}", False, previous_output, {"r": 1}
        return None, None, True, previous_output, None

    requests = [req(d["question"], {"max_new_tokens": 6}, doc_to_visual, doc_to_text, i, "toy", "test")
                for i, d in enumerate(docs)]
    out = adapter.generate_until_multi_round(requests)
    single = with_batch(adapter, 1).generate_until
    for i, d in enumerate(docs):
        r0 = single(gen_requests(docs, gen_kwargs={"max_new_tokens": 6})[i:i + 1])[0]
        if d["images"]:
            again = f"You said {r0}. {d['question']}"
            r1 = single([req(again, {"max_new_tokens": 6}, doc_to_visual, i, "toy", "test")])[0]
            assert out[i] == [r0, r1]
        else:
            assert out[i] == [r0]
    assert (docs[0]["question"], [out[0][0], out[0][1]], 2, {"r": 1}) in calls


# ------------------------------------------------------------------ with lmms-eval itself


@pytest.fixture(scope="module")
def lmms_eval():
    """lmms-eval, its task and evaluator modules imported. Importing them turns Pillow's
    LOAD_TRUNCATED_IMAGES on for the whole process (once, at import); it is put back so that the
    rest of the test session's image loading is fusionlm's own."""
    module = pytest.importorskip("lmms_eval")
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    import lmms_eval.api.task  # noqa: F401
    import lmms_eval.evaluator  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # what the adapter has to live with
    ImageFile.LOAD_TRUNCATED_IMAGES = before
    yield module
    ImageFile.LOAD_TRUNCATED_IMAGES = before


def test_registered_with_lmms_eval(lmms_eval, checkpoints):
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import MODEL_REGISTRY
    from lmms_eval.models import get_model

    from fusionlm.evaluate.lmms import FusionLMEval

    assert issubclass(FusionLMEval, lmms) and issubclass(FusionLMEval, FusionLMAdapter)
    assert get_model("fusionlm") is FusionLMEval and MODEL_REGISTRY["fusionlm"] is FusionLMEval
    lm = get_model("fusionlm").create_from_arg_string(f"pretrained={checkpoints['unified']},device=cpu,batch_size=8",
                                                      {"batch_size": 1, "max_batch_size": None, "device": None})
    assert isinstance(lm, lmms) and lm.batch_size == 8 and lm.rank == 0 and lm.world_size == 1


def test_lmms_eval_instances(lmms_eval, checkpoints, loaded, docs):
    """Real lmms-eval ``Instance`` requests give what the plain adapter gives."""
    from lmms_eval.api.instance import Instance

    from fusionlm.evaluate.lmms import FusionLMEval

    lm = FusionLMEval(pretrained=str(checkpoints["cross_attention"]), device="cpu", batch_size=3)
    lm.task_dict = {"toy": {"test": docs}}
    plain = loaded["cross_attention"]
    plain.task_dict = lm.task_dict

    def instance(kind, args, i):
        return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})

    gen = [instance("generate_until", r.args, i) for i, r in enumerate(gen_requests(docs))]
    assert lm.generate_until(gen) == plain.generate_until(gen_requests(docs))
    ll_args = [(d["question"], " " + d["answer"], doc_to_visual, i, "toy", "test") for i, d in enumerate(docs)]
    got = lm.loglikelihood([instance("loglikelihood", a, i) for i, a in enumerate(ll_args)])
    want = plain.loglikelihood([req(*a) for a in ll_args])
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-5)


TASK_YAML = """\
task: fusionlm_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  until: ["\\n\\n"]
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 0.0
"""

TASK_UTILS = """\
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / name).convert("RGB") for name in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def write_toy_task(folder: Path, docs: list[dict]) -> None:
    """An lmms-eval task ``fusionlm_toy`` in ``folder``: its YAML, its utils and a JSON-lines
    dataset whose images are PNG files beside it."""
    rows = []
    for i, d in enumerate(docs):
        names = []
        for k, image in enumerate(d["images"]):
            names.append(f"doc{i}_{k}.png")
            image.save(folder / names[-1])
        rows.append({"question": d["question"], "answer": d["answer"], "images": names})
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy.yaml").write_text(TASK_YAML.format(data=folder / "toy.jsonl"))
    (folder / "utils.py").write_text(TASK_UTILS)


def offline(folder: Path) -> dict[str, str]:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder / "hf"),
            "HF_HOME": str(folder / "hf_home")}


def reference_answers(adapter, docs, max_new_tokens=8) -> list[str]:
    out = []
    for d in docs:
        prompt = "".join("<image>\n" for _ in d["images"]) + d["question"]
        out.append(generate(adapter.model, adapter.tokenizer, [Request(prompt, d["images"])], adapter.spec,
                            max_new_tokens=max_new_tokens)[0].split("\n\n")[0])
    return out


def test_simple_evaluate_on_a_local_task(lmms_eval, checkpoints, loaded, docs, tmp_path, monkeypatch):
    """A whole lmms-eval run, ``--model fusionlm`` on a task read from local files (no network):
    its answers are fusionlm's own."""
    for key, value in offline(tmp_path).items():
        monkeypatch.setenv(key, value)
    write_toy_task(tmp_path, docs)

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as in an lmms-eval process
    results = simple_evaluate(model="fusionlm", model_args=f"pretrained={checkpoints['unified']},device=cpu",
                              tasks=["fusionlm_toy"], batch_size=2, log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path)))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    samples = sorted(results["samples"]["fusionlm_toy"], key=lambda s: s["doc_id"])
    answers = [s["resps"][0][0] for s in samples]
    assert answers == reference_answers(loaded["unified"], docs)
    assert any(answers) and results["results"]["fusionlm_toy"]["exact_match,none"] == pytest.approx(
        sum(a.lower() == d["answer"].lower() for a, d in zip(answers, docs)) / len(docs))


def test_command_line(lmms_eval, checkpoints, loaded, docs, tmp_path):
    """The documented command: ``python -m fusionlm.evaluate.lmms`` with lmms-eval's own arguments
    (``--model fusionlm``; batch_size both in --model_args and on the command line)."""
    write_toy_task(tmp_path, docs)
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **offline(tmp_path), "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "fusionlm.evaluate.lmms", "--model", "fusionlm",
           "--model_args", f"pretrained={checkpoints['unified']},device=cpu,batch_size=3", "--batch_size", "2",
           "--tasks", "fusionlm_toy", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
           "--log_samples"]
    run = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "fusionlm_toy" in run.stdout and "exact_match" in run.stdout
    [log] = (tmp_path / "out").rglob("*_samples_fusionlm_toy.jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["doc_id"])
    assert [r["filtered_resps"] for r in rows] == reference_answers(loaded["unified"], docs)
