"""Pretrained parts: an encoder and an LLM from a directory (or hub id), their own tokenizer and
chat template, Method B on several LLM families, offline reloading, custom-code refusal.

The "pretrained" checkpoints are tiny random models written here with ``save_pretrained``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipImageProcessorPil

from fusionlm.checkpoint import build_model, load_model
from fusionlm.config import from_dict, validate
from fusionlm.data.chat import encode
from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.data.sample import Sample
from fusionlm.data.tokenizer import prepare_tokenizer
from fusionlm.errors import ConfigError
from fusionlm.generate import Request, generate
from fusionlm.train.loop import Trainer
from helpers_train import tiny_dict
from hf_tiny import llm_checkpoint, tower_checkpoint


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    return {
        "llama": llm_checkpoint(tmp / "llama", "llama"), "qwen2": llm_checkpoint(tmp / "qwen2", "qwen2"),
        "gpt2": llm_checkpoint(tmp / "gpt2", "gpt2"), "bare": llm_checkpoint(tmp / "bare", chat_template=False),
        "siglip": tower_checkpoint(tmp / "siglip", "siglip"), "clip": tower_checkpoint(tmp / "clip", "clip"),
    }


def recipe(encoder: dict, llm: dict, fusion: str = "unified", stages=None):
    data = tiny_dict(model={"encoder": encoder, "llm": llm, "connector": {"kind": "mlp"},
                            "fusion": {"kind": fusion, "every_n": 2}, "tokenizer": {}})
    if stages is not None:
        data["stages"] = stages
    return validate(from_dict(data))


def tokenizer_for(config, source):
    tok = AutoTokenizer.from_pretrained(str(source))
    t = config.model.tokenizer
    return prepare_tokenizer(tok, image_token=t.image_token, newline_token=t.newline_token, need_newline=False)


def test_pretrained_parts_train_and_reload_without_their_files(parts, tmp_path):
    llm_dir, tower_dir = tmp_path / "llm", tmp_path / "tower"
    shutil.copytree(parts["llama"], llm_dir)
    shutil.copytree(parts["siglip"], tower_dir)
    stages = [
        {"name": "pretrain_llm", "stand_in_for": "llm", "train": ["llm"], "mixture": {"text_only": 1}, "steps": 50},
        {"name": "align", "train": ["connector"], "mixture": {"color": 1}, "steps": 3, "batch_size": 2,
         "warmup_steps": 1},
    ]
    config = recipe({"kind": "siglip", "hf": str(tower_dir), "preprocess": "hf"}, {"hf": str(llm_dir)}, stages=stages)
    logs = []
    trainer = Trainer(config, tmp_path / "run", log=logs.append)
    progress = trainer.run()
    assert progress.step == 3  # the stand-in stage was skipped
    assert any("pretrain_llm): skipped, the llm is pretrained" in line for line in logs)
    original = AutoModelForCausalLM.from_pretrained(llm_dir)
    tok = trainer.tokenizer
    assert "<image>" in tok.get_vocab() and tok.chat_template == original_template(llm_dir)
    assert trainer.model.llm.get_input_embeddings().weight.shape[0] == len(tok) == original.config.vocab_size + 1
    # The frozen LLM kept its own names and values (only the embedding grew by one row).
    ours = {k: v.cpu() for k, v in trainer.model.llm.state_dict().items()}  # the run may be on a GPU
    for name, tensor in original.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(ours[name][: tensor.shape[0]], tensor)
        else:
            assert torch.equal(ours[name], tensor), name
    shutil.rmtree(llm_dir)  # the checkpoint must not need the original files any more
    shutil.rmtree(tower_dir)
    model, tokenizer, saved = load_model(tmp_path / "run")
    assert saved.model.llm.arch["model_type"] == "llama" and saved.model.encoder.arch["model_type"] == "siglip_vision_model"
    assert saved.model.tokenizer.end_token == "<|eot_id|>"
    spec = ImageSpec.for_model(model, saved)
    (answer,) = generate(model, tokenizer, [Request("<image>\nWhat color?", [torch_image()])], spec, max_new_tokens=3)
    assert isinstance(answer, str)


def original_template(path):
    return AutoTokenizer.from_pretrained(str(path)).chat_template


def torch_image():
    from PIL import Image

    return Image.new("RGB", (40, 24), (200, 30, 30))


def test_tower_image_processor_is_recorded_and_used(parts):
    config = recipe({"kind": "siglip", "hf": str(parts["siglip"]), "preprocess": "hf"}, {"hf": str(parts["llama"])})
    model = build_model(config, tokenizer_for(config, parts["llama"]))
    assert model.config.encoder.processor["image_processor_type"].startswith("SiglipImageProcessor")
    assert config.model.encoder.processor is None  # the caller's config stays as given
    img = torch_image()
    theirs = SiglipImageProcessorPil.from_pretrained(str(parts["siglip"]))(images=[img], return_tensors="pt")
    assert torch.equal(ImageSpec.for_model(model, config).process(img).pixels, theirs["pixel_values"][0])
    assert ImageSpec.for_model(model, config).size == 32  # the tower's size, not the recipe's 16


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_method_b_on_any_causal_lm_keeps_the_text_model(family, parts):
    config = recipe({"kind": "clip", "hf": str(parts["clip"])}, {"hf": str(parts[family])}, fusion="cross_attention")
    tok = tokenizer_for(config, parts[family])
    model = build_model(config, tok).eval()
    original = AutoModelForCausalLM.from_pretrained(parts[family]).eval()
    assert sorted(model.cross_blocks) == ["0", "2"]
    # state-dict names unchanged: the original checkpoint's weights load into the LLM as they are
    names = set(original.state_dict())
    assert names == set(model.llm.state_dict())
    # gates at zero: the model is exactly the text model, images or not
    ids = torch.tensor([tok("What color is the square?")["input_ids"]])
    with torch.no_grad():
        text = original(ids).logits
        ours = model(ids).logits[..., : text.shape[-1]]
    assert torch.allclose(ours, text, atol=1e-5)
    # open the gates: a token sees only the images before it
    for block in model.cross_blocks.values():
        torch.nn.init.constant_(block.attn_gate, 1.0)
        torch.nn.init.constant_(block.ffn_gate, 1.0)
    sample = Sample(id="s", task="t", messages=[{"role": "user", "content": "<image> one <image> two"}],
                    images=[torch_image(), torch_image()])
    spec = ImageSpec.for_model(model, config)
    enc = encode(sample, tok, model.image_layout(), max_length=128, end_token=model.config.tokenizer.end_token,
                 add_generation_prompt=True)
    ids = torch.tensor([enc.input_ids])
    pixels = torch.stack([spec.pixels(i) for i in sample.images])
    other = pixels.clone()
    other[1] = torch.randn(other[1].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids, pixel_values=pixels).logits[0], model(ids, pixel_values=other).logits[0]
    second = [i for i, t in enumerate(enc.input_ids) if t == model.ids.image][1]
    changed = (a - b).abs().amax(-1) > 0
    assert not changed[:second].any() and changed[second:].all()


def test_chat_template_of_the_llm_decides_the_labels(parts):
    config = recipe({"kind": "siglip"}, {"hf": str(parts["llama"])})
    tok = tokenizer_for(config, parts["llama"])
    sample = Sample(id="c", task="t", messages=[
        {"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "a square"},
    ], images=["x.png"])
    enc = encode(sample, tok, [7, 7], max_length=256, end_token="<|eot_id|>")
    trained = tok.decode([t for t in enc.labels if t != -100])
    assert trained == "red<|eot_id|>a square<|eot_id|>"
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids.count(7) == 2


def test_an_llm_without_chat_template_gets_fusionlms(parts):
    config = recipe({"kind": "siglip"}, {"hf": str(parts["bare"])})
    tok = tokenizer_for(config, parts["bare"])
    assert "<|assistant|>" in tok.get_vocab() and "<|end|>" in tok.get_vocab()
    model = build_model(config, tok)
    assert model.config.tokenizer.end_token == "<|end|>" and model.ids.end == tok.convert_tokens_to_ids("<|end|>")
    assert model.llm.get_input_embeddings().weight.shape[0] == len(tok)


def test_custom_code_is_refused_unless_allowed(parts, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(parts["llama"], custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps(cfg))
    config = recipe({"kind": "siglip"}, {"hf": str(custom)})
    with pytest.raises(ConfigError, match=r"model\.llm\.hf: .* ships its own model code .* model\.llm\.allow_custom_code"):
        build_model(config, tokenizer_for(config, custom))


def test_missing_pretrained_part_names_the_key(tmp_path, parts):
    config = recipe({"kind": "siglip", "hf": str(tmp_path / "nowhere")}, {"hf": str(parts["llama"])})
    with pytest.raises(ConfigError, match=r"model\.encoder\.hf: cannot read a transformers config"):
        build_model(config, tokenizer_for(config, parts["llama"]))


def test_parts_load_in_the_dtype_asked_for(parts):
    config = recipe({"kind": "siglip", "hf": str(parts["siglip"]), "dtype": "bfloat16"},
                    {"hf": str(parts["llama"]), "dtype": "bfloat16"})
    model = build_model(config, tokenizer_for(config, parts["llama"]))
    assert model.llm.dtype == torch.bfloat16 and model.encoder.tower.dtype == torch.bfloat16


def test_walkthrough_siglip_plus_small_llm_with_the_llama32_recipe(parts, tmp_path, capsys):
    """README walk-through 2: a pretrained tower and LLM, cross-attention added, trained with llama32."""
    from fusionlm.cli import main
    from helpers_train import checkpoints, weights

    run = tmp_path / "run"
    common = ["--set", f"model.encoder.hf={parts['siglip']}", "--set", "model.encoder.preprocess=hf",
              "--set", f"model.llm.hf={parts['llama']}", "--set", "stages.2.steps=2", "--set", "stages.2.batch_size=2",
              "--set", "data.loader_workers=0"]
    assert main(["train", "llama32", "--out", str(run), *common]) == 0
    out = capsys.readouterr().out
    assert "pretrain_llm): skipped" in out and "pretrain_encoder): skipped" in out
    trained = weights(checkpoints(run)[-1])
    original = AutoModelForCausalLM.from_pretrained(parts["llama"]).state_dict()
    for name, tensor in original.items():  # the LLM stays frozen: the original weights, under their own names
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(trained[f"llm.{name}"], tensor), name
    assert any(k.startswith("cross_blocks.") for k in trained)
    image = tmp_path / "red.png"
    torch_image().save(image)
    assert main(["generate", "--checkpoint", str(run), "--image", str(image), "--prompt", "What color?",
                 "--max-new-tokens", "2"]) == 0
    wrong = ["--set", "model.encoder.kind=clip"]
    assert main(["train", "llama32", "--out", str(tmp_path / "wrong"), *common, *wrong]) == 2
    assert "is a 'siglip_vision_model' checkpoint, not one of clip_vision_model, clip" in capsys.readouterr().err
