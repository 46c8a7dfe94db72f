"""Fuyu (``FuyuForCausalLM``): no image encoder; each raw patch, projected by one linear layer,
takes the place of an image token, a row of them closed by a newline token.

Weight names: ``model.vision_embed_tokens`` ↔ ``connector.proj``, ``model.language_model`` ↔
``llm.model``, ``lm_head`` ↔ ``llm.lm_head``; the ``patches`` encoder has no weights.

``FuyuProcessor`` writes a prompt as the image's rows, ``<s>``, the text, then ``<0x04>`` (the
beginning of the answer), and encodes the text apart from the image so that the tokenizer's
normalizer puts its "▁" before the text's first word (and before the image, where the processor
drops it). fusionlm encodes a conversation in one piece, so on import the image token and
``<s>`` become tokens the tokenizer splits off before normalising (same ids), and a chat template
writes a user turn as ``|SPEAKER|<s>`` + text + ``<0x04>``: the same ids as the processor's. The
export turns those two back into plain vocabulary pieces, which ``FuyuProcessor`` needs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from transformers import AutoTokenizer, FuyuConfig, FuyuForCausalLM, FuyuProcessor

from ..config import ConnectorConfig, EncoderConfig, FusionConfig, ModelConfig, TokenizerConfig
from ..data.pixels.processing import hf_image_processor
from .. import designs
from ..errors import ConfigError, ExportError
from ..model import FusionLM
from .formats import Format, register
from .llava import llm_config

IMAGE_TOKEN, NEWLINE_TOKEN = "|SPEAKER|", "|NEWLINE|"  # what FuyuProcessor writes for an image
BOS, BOA = "<s>", "<0x04>"  # after the image; after the prompt (the beginning of the answer)


def chat_template(image_token: str, end_token: str) -> str:
    """User turns as FuyuProcessor writes a prompt, assistant turns closed by ``end_token``.

    An image's own line break (fusionlm puts ``<image>\\n`` before a request's prompt) is dropped:
    Fuyu's image already ends with a newline token.
    """
    q = json.dumps  # a Jinja string literal
    user = (f"{{{{ m['content'] | replace({q(image_token + chr(10))}, {q(image_token)}) "
            f"| replace({q(image_token)}, {q(image_token + BOS)}) }}}}{BOA}")
    return (f"{{% for m in messages %}}{{% if m['role'] == 'assistant' %}}{{{{ m['content'] }}}}{end_token}"
            f"{{% else %}}{user}{{% endif %}}{{% endfor %}}")


def _is_fuyu_processor(settings: dict[str, Any] | None) -> bool:
    return str((settings or {}).get("image_processor_type", "")).startswith("Fuyu")


class Fuyu(Format):
    name, model_type = "fuyu", "fuyu"
    renames = [
        ("connector.proj.", "model.vision_embed_tokens."),
        ("llm.model.", "model.language_model."),
        ("llm.lm_head.", "lm_head."),
    ]

    def hf_class(self):
        return FuyuForCausalLM

    # ------------------------------------------------------------------ import

    def recipe(self, hf_config: FuyuConfig, processor, tokenizer) -> ModelConfig:
        p, text = hf_config.patch_size, hf_config.text_config
        if not _is_fuyu_processor(processor):
            raise ConfigError("a Fuyu checkpoint needs its FuyuImageProcessor settings (preprocessor_config.json "
                              "or processor_config.json) to cut images into patches")
        patch = processor.get("patch_size") or {}
        if (patch.get("height"), patch.get("width")) != (p, p):
            raise ConfigError(f"the image processor cuts {patch.get('height')}x{patch.get('width')} patches but the "
                              f"model's patch_size is {p}")
        image_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_id)
        if image_token != IMAGE_TOKEN:
            raise ConfigError(f"image_token_id {hf_config.image_token_id} is {image_token!r}, but FuyuProcessor "
                              f"writes {IMAGE_TOKEN!r} for an image")
        missing = [t for t in (NEWLINE_TOKEN, BOS, BOA) if t not in tokenizer.get_vocab()]
        if missing or tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer lacks what FuyuProcessor writes: {missing or 'an eos token'}")
        return ModelConfig(
            encoder=EncoderConfig(kind="patches", image_size=max(p, hf_config.image_size // p * p), patch_size=p,
                                  hidden_size=3 * p * p, num_layers=0, preprocess="hf", processor=processor),
            connector=ConnectorConfig(kind="linear", hidden_size=text.hidden_size, bias=True),
            llm=llm_config(text),
            fusion=FusionConfig(kind=designs.Fuyu.name),
            tokenizer=TokenizerConfig(image_token=IMAGE_TOKEN, newline_token=NEWLINE_TOKEN,
                                      end_token=tokenizer.eos_token),
        )

    def adapt_tokenizer(self, tokenizer, model: ModelConfig):
        tcfg = model.tokenizer
        tokenizer.chat_template = chat_template(tcfg.image_token, tcfg.end_token)
        added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
        for text in (tcfg.image_token, BOS):  # split off before the normaliser runs (ids unchanged)
            old = added.get(text)
            if old is None or old.normalized:
                tokenizer.add_tokens([AddedToken(text, normalized=False, special=bool(old and old.special))])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # FuyuProcessor pads with id 0
        return tokenizer

    # ------------------------------------------------------------------ export

    def check(self, model: FusionLM) -> None:
        c = model.config
        problems = []
        if type(model.design) is not designs.Fuyu:
            problems.append(f"fusion is {c.fusion.kind!r} (Fuyu puts rows of patches, each closed by a newline "
                            f"token, in the sequence: 'fuyu')")
        if c.encoder.kind != "patches":
            problems.append(f"the encoder is {c.encoder.kind!r} (Fuyu has none: raw 'patches')")
        elif c.encoder.preprocess != "hf" or not _is_fuyu_processor(c.encoder.processor):
            problems.append("images are not cut into patches by a FuyuImageProcessor (encoder preprocess 'hf'; "
                            "fusionlm's letterbox has no counterpart in FuyuProcessor)")
        if c.connector.kind != "linear" or not c.connector.bias:
            what = c.connector.kind if c.connector.kind != "linear" else "linear without bias"
            problems.append(f"the connector is {what!r} (Fuyu projects patches with one 'linear' layer with bias)")
        if not (hasattr(model.llm, "model") and hasattr(model.llm, "lm_head")):
            problems.append(f"the LLM is a {type(model.llm).__name__} (Fuyu's language model is a decoder under "
                            f"'model' with its head in 'lm_head', such as Persimmon or Llama)")
        if c.tokenizer.image_token != IMAGE_TOKEN:
            problems.append(f"the image token is {c.tokenizer.image_token!r} (FuyuProcessor's is {IMAGE_TOKEN!r})")
        if type(model.design) is designs.Fuyu and c.tokenizer.newline_token != NEWLINE_TOKEN:
            problems.append(f"the newline token is {c.tokenizer.newline_token!r} (FuyuProcessor's is "
                            f"{NEWLINE_TOKEN!r})")
        if problems:
            raise ExportError("cannot export as fuyu: " + "; ".join(problems))

    def hf_config(self, model: FusionLM) -> FuyuConfig:
        enc = model.config.encoder
        return FuyuConfig(
            text_config=model.llm.config.to_dict(), image_token_id=model.ids.image, patch_size=enc.patch_size,
            image_size=enc.image_size, num_channels=3, tie_word_embeddings=model.llm.config.tie_word_embeddings,
        )

    def processor(self, model: FusionLM, tokenizer) -> FuyuProcessor:
        return FuyuProcessor(image_processor=hf_image_processor(model.config.encoder.processor),
                             tokenizer=plain_pieces(tokenizer, [model.config.tokenizer.image_token, BOS]))


def plain_pieces(tokenizer, tokens: list[str]):
    """A copy of ``tokenizer`` in which ``tokens``, where its model has them as vocabulary pieces,
    are no longer split off as added tokens (undoes ``Fuyu.adapt_tokenizer``)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        data = json.loads(path.read_text())
        model = tokenizer.backend_tokenizer.model
        data["added_tokens"] = [t for t in data["added_tokens"] if not (
            t["content"] in tokens and not t["special"] and model.token_to_id(t["content"]) is not None)]
        path.write_text(json.dumps(data, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(tmp)


register(Fuyu())
