"""Emu3 (``Emu3ForConditionalGeneration``): one Llama-shaped decoder whose vocabulary holds the VQ
model's codes (fusionlm's ``shared`` generation), reading pictures as those codes too (``early``
fusion, no vision tower).

Weight names: ``model.vqmodel`` ↔ ``image_tokenizer.vq``, ``model.text_model`` ↔ ``llm.model``,
``lm_head`` ↔ ``llm.lm_head``.

A picture, read or drawn, is written ``<|image start|>``, its grid as text (``4*4``),
``<|image token|>``, each row's codes then ``<|extra_200|>``, ``<|extra_201|>``, ``<|image end|>``
(``model.generation``: ``size_header``, ``header_token``, ``row_end_token``, ``frame_end_token``).
The config's ``vocabulary_map`` names code ``i`` ``<|visual token {i:06d}|>``; fusionlm keeps the
codes at consecutive ids from ``model.generation.code_offset``, so a map whose codes are not
consecutive is refused. Emu3's processor resizes a picture to keep its shape; fusionlm reads and
draws one square size, ``image_size`` (taken from the processor's ``max_pixels``), so parity holds
for pictures of that size.
"""

from __future__ import annotations

import math

from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor
from transformers.models.emu3.configuration_emu3 import Emu3TextConfig

from .. import designs
from ..config import (
    ConnectorConfig, EncoderConfig, FusionConfig, GenerationConfig, ImageTokenizerConfig, ModelConfig, TokenizerConfig,
)
from ..errors import ConfigError, ExportError
from ..hub import arch_of
from ..model import FusionLM
from .formats import Format, register
from .llava import llm_config

VISUAL = "<|visual token {:06d}|>"  # code i's name in Emu3's vocabulary map
# Emu3's own token names; its model finds the image and end-of-row tokens by these names
IMAGE, ROW_END, FRAME_END = "<image>", "<|extra_200|>", "<|extra_201|>"
BEGIN, END, HEADER = "<|image start|>", "<|image end|>", "<|image token|>"
SPATIAL = 8  # Emu3Processor's fixed downsample ratio: codes per side = pixels per side / 8
BOS_PREFIX = "{{ bos_token }}"  # the processor writes BOS before the chat template; fusionlm's template does


class Emu3(Format):
    name, model_type = "emu3", "emu3"
    renames = [
        ("image_tokenizer.vq.", "model.vqmodel."),
        ("llm.model.", "model.text_model."),
        ("llm.lm_head.", "lm_head."),
    ]

    def hf_class(self):
        return Emu3ForConditionalGeneration

    # --- import
    def recipe(self, hf_config: Emu3Config, processor, tokenizer) -> ModelConfig:
        vq, text, vocab = hf_config.vq_config, hf_config.text_config, hf_config.vocabulary_map or {}
        problems = []
        ids = [vocab.get(VISUAL.format(i)) for i in range(vq.codebook_size)]
        offset = ids[0] if ids and ids[0] is not None else -1
        if ids != list(range(offset, offset + vq.codebook_size)):
            problems.append(f"the vocabulary map's {vq.codebook_size} visual tokens are not at consecutive ids "
                            f"(fusionlm keeps the codes at consecutive ids)")
        elif len(tokenizer) < offset + vq.codebook_size:
            problems.append(f"the tokenizer has {len(tokenizer)} tokens, short of the visual tokens the vocabulary "
                            f"map puts at {offset}..{offset + vq.codebook_size - 1}")
        for name in (IMAGE, ROW_END):
            if name not in vocab:
                problems.append(f"the vocabulary map has no {name!r} (Emu3's model looks it up by name)")
        processor = processor or {}
        mean, std = processor.get("image_mean", [0.5] * 3), processor.get("image_std", [0.5] * 3)
        if list(mean) != [0.5] * 3 or list(std) != [0.5] * 3:
            problems.append(f"the image processor normalises with mean {mean} and std {std} (fusionlm's codes read "
                            f"pixels in [-1, 1]: mean = std = 0.5)")
        if problems:
            raise ConfigError("cannot import this Emu3 checkpoint: " + "; ".join(problems))
        spatial = 2 ** (len(vq.channel_multiplier) - 1)
        side = math.isqrt(processor.get("max_pixels", 1024 * 1024)) // spatial * spatial
        named = {k: getattr(tokenizer, k, None) for k in ("boi_token", "eoi_token", "image_wrapper_token", "eof_token")}
        return ModelConfig(
            encoder=EncoderConfig(kind="none"),
            connector=ConnectorConfig(kind="none"),
            llm=llm_config(text),
            fusion=FusionConfig(kind=designs.Early.name),
            tokenizer=TokenizerConfig(image_token=IMAGE),
            image_tokenizer=ImageTokenizerConfig(kind="emu3", arch=arch_of(vq), image_size=side),
            generation=GenerationConfig(
                kind="shared", begin_token=named["boi_token"] or BEGIN, end_token=named["eoi_token"] or END,
                row_end_token=ROW_END, size_header=True, header_token=named["image_wrapper_token"] or HEADER,
                frame_end_token=named["eof_token"] or FRAME_END, code_offset=offset),
        )

    def adapt_tokenizer(self, tokenizer, model: ModelConfig):
        """Emu3's processor writes BOS before the rendered chat template; fusionlm renders the
        template alone, so the template starts with BOS here (and loses it again on export)."""
        template = tokenizer.chat_template
        if tokenizer.bos_token and template and not template.startswith(BOS_PREFIX):
            tokenizer.chat_template = BOS_PREFIX + template
        return tokenizer

    # --- export
    def check(self, model: FusionLM) -> None:
        c, ids = model.config, model.ids
        problems = []
        if type(model.design) is not designs.Early:
            problems.append(f"fusion is {c.fusion.kind!r} (Emu3 reads pictures as codes: 'early')")
        tok = c.image_tokenizer
        if tok is None or tok.kind != "emu3":
            problems.append(f"the image tokenizer is {tok.kind if tok else None!r} (Emu3 draws in an 'emu3' VQ model)")
        elif model.image_tokenizer.config.downsample != SPATIAL:
            problems.append(f"the VQ model draws a code per {model.image_tokenizer.config.downsample} pixels "
                            f"(Emu3's processor counts one per {SPATIAL})")
        g = c.generation
        if g.kind != "shared":
            problems.append(f"the generation is {g.kind!r} (Emu3's is 'shared')")
        missing = [k for k in ("row_end_token", "header_token", "frame_end_token") if not getattr(g, k)]
        if missing or not g.size_header:
            problems.append(f"a picture is not written as Emu3 writes one (set model.generation."
                            f"{', '.join(missing + ['size_header: true'] * (not g.size_header))})")
        if model.llm.config.model_type not in ("llama", "emu3_text_model"):
            problems.append(f"the LLM is {model.llm.config.model_type!r} (Emu3's text model is a Llama)")
        if ids.bos < 0:
            problems.append("the tokenizer has no BOS token (Emu3's processor writes one first)")
        if problems:
            raise ExportError("cannot export as emu3: " + "; ".join(problems))

    def hf_config(self, model: FusionLM) -> Emu3Config:
        llm = model.llm.config
        fields = set(Emu3TextConfig.__dataclass_fields__) | {"head_dim"}
        text = {k: v for k, v in llm.to_dict().items() if k in fields}
        text.setdefault("attention_dropout", 0.0)  # a Llama trained without dropout
        text.update(mlp_bias=getattr(llm, "mlp_bias", False), attention_bias=getattr(llm, "attention_bias", False))
        # what Emu3's model reads of the map: the image and end-of-row tokens by name, and the codes
        vocab = {IMAGE: model.ids.image, ROW_END: model.ids.row_end,
                 **{VISUAL.format(i): model.code_offset + i for i in range(model.image_tokenizer.codebook_size)}}
        return Emu3Config(vq_config=model.image_tokenizer.vq.config.to_dict(), text_config=text, vocabulary_map=vocab,
                          tie_word_embeddings=llm.tie_word_embeddings)

    def processor(self, model: FusionLM, tokenizer) -> Emu3Processor:
        side = model.image_tokenizer.config.image_size
        images = Emu3ImageProcessor(min_pixels=side * side, max_pixels=side * side, spatial_factor=SPATIAL,
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
        g = model.config.generation
        named = {"image_token": model.config.tokenizer.image_token, "boi_token": g.begin_token,
                 "eoi_token": g.end_token, "image_wrapper_token": g.header_token, "eof_token": g.frame_end_token}
        if any(getattr(tokenizer, k, None) != v for k, v in named.items()):
            tokenizer._set_model_specific_special_tokens(special_tokens=named)  # what Emu3Processor reads
        template = tokenizer.chat_template
        if template and template.startswith(BOS_PREFIX):
            template = template[len(BOS_PREFIX):]
        return Emu3Processor(image_processor=images, tokenizer=tokenizer, chat_template=template)

    def generation_settings(self, model: FusionLM, tokenizer) -> dict:
        return {"bos_token_id": tokenizer.bos_token_id}


register(Emu3())
