"""Janus (``JanusForConditionalGeneration``): reads pictures through a SigLIP-style tower + MLP
aligner (Method A) and draws them through a VQ model's codes with an embedding + aligner of their
own in and a generation head out (fusionlm's ``decoupled`` generation), one Llama between them.

Weight names: ``model.vision_model`` ↔ ``encoder.tower``, ``model.aligner`` ↔ ``connector``,
``model.vqmodel`` ↔ ``image_tokenizer.vq``, ``model.generation_embeddings`` / ``generation_aligner``
/ ``generation_head`` ↔ ``gen_embed`` / ``gen_aligner`` / ``gen_head``, ``model.language_model`` ↔
``llm.model``, ``lm_head`` ↔ ``llm.lm_head``.

Janus's aligners are Linear, then (activation, Linear) ``depth - 1`` times; fusionlm's MLP
connector and generation heads are the ``depth: 2`` case, so only that one is taken. Janus ties
the two grids: the VQ model draws as many codes per side as the tower reads patches per side, and
guides against ``padded`` null prompts (``model.generation.null_prompt``).
"""

from __future__ import annotations

from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

from ..config import (
    ConnectorConfig, EncoderConfig, FusionConfig, GenerationConfig, ImageTokenizerConfig, ModelConfig, TokenizerConfig,
)
from ..data.pixels.processing import hf_image_processor
from .. import designs
from ..errors import ConfigError, ExportError
from ..hub import arch_of
from ..model import FusionLM
from .formats import Format, register
from .llava import llm_config

BEGIN, END = "<begin_of_image>", "<end_of_image>"  # Janus's own names, for a tokenizer that names none


class Janus(Format):
    name, model_type = "janus", "janus"
    renames = [
        ("encoder.tower.", "model.vision_model."),
        ("connector.linear_1.", "model.aligner.fc1."),
        ("connector.linear_2.", "model.aligner.hidden_layers.0."),
        ("image_tokenizer.vq.", "model.vqmodel."),
        ("gen_embed.", "model.generation_embeddings."),
        ("gen_aligner.net.0.", "model.generation_aligner.fc1."),
        ("gen_aligner.net.2.", "model.generation_aligner.hidden_layers.0."),
        ("gen_head.net.0.", "model.generation_head.proj_out."),
        ("gen_head.net.2.", "model.generation_head.vision_head."),
        ("llm.model.", "model.language_model."),
        ("llm.lm_head.", "lm_head."),
    ]

    def hf_class(self):
        return JanusForConditionalGeneration

    def recipe(self, hf_config: JanusConfig, processor, tokenizer) -> ModelConfig:
        vision, vq, text = hf_config.vision_config, hf_config.vq_config, hf_config.text_config
        problems = []
        if vision.depth != 2:
            problems.append(f"vision_config.depth is {vision.depth} (fusionlm's MLP aligner has 2 layers)")
        if vq.num_hidden_layers != 2:
            problems.append(f"vq_config.num_hidden_layers is {vq.num_hidden_layers} (the generation aligner "
                            f"fusionlm builds has 2 layers)")
        if vq.hidden_act != "gelu":
            problems.append(f"vq_config.hidden_act is {vq.hidden_act!r} (the generation head's is gelu)")
        if vq.projection_dim != text.hidden_size or vq.image_token_embed_dim != text.hidden_size:
            problems.append(f"the generation head is {vq.image_token_embed_dim} -> {vq.projection_dim} wide, "
                            f"the LLM {text.hidden_size}")
        if problems:
            raise ConfigError("cannot import this Janus checkpoint: " + "; ".join(problems))
        begin = getattr(tokenizer, "boi_token", None) or BEGIN
        end = getattr(tokenizer, "eoi_token", None) or END
        return ModelConfig(
            encoder=EncoderConfig(
                kind="janus", arch=arch_of(vision), image_size=vision.image_size, patch_size=vision.patch_size,
                hidden_size=vision.hidden_size, num_layers=vision.num_hidden_layers,
                num_heads=vision.num_attention_heads, intermediate_size=int(vision.hidden_size * vision.mlp_ratio),
                feature_layer=-1, drop_cls=False, preprocess="hf" if processor else "letterbox", processor=processor,
            ),
            connector=ConnectorConfig(kind="mlp", hidden_size=vision.projection_dim, act=vision.hidden_act, bias=True),
            llm=llm_config(text),
            fusion=FusionConfig(kind=designs.Unified.name),
            tokenizer=TokenizerConfig(image_token=tokenizer.convert_ids_to_tokens(hf_config.image_token_id),
                                      image_begin=begin, image_end=end),
            image_tokenizer=ImageTokenizerConfig(kind="janus", arch=arch_of(vq)),
            generation=GenerationConfig(kind="decoupled", head_hidden=vq.projection_dim, begin_token=begin,
                                        end_token=end, null_prompt="padded"),
        )

    def check(self, model: FusionLM) -> None:
        c = model.config
        width = model.llm.config.hidden_size
        problems = []
        if type(model.design) is not designs.Unified:
            problems.append(f"fusion is {c.fusion.kind!r} (Janus puts image tokens in the sequence: 'unified')")
        if c.encoder.kind != "janus":
            problems.append(f"the encoder is {c.encoder.kind!r} (Janus reads with its own 'janus' tower)")
        elif c.encoder.feature_layer != -1:
            problems.append(f"the tower's feature layer is {c.encoder.feature_layer} (Janus reads its last, -1)")
        if c.encoder.resolution is not None:
            problems.append(f"the tower runs at resolution {c.encoder.resolution} (Janus's runs at its own size)")
        if c.tiling.max_tiles:
            problems.append("images are tiled (Janus sees each image whole)")
        if c.connector.kind != "mlp":
            problems.append(f"the connector is {c.connector.kind!r} (Janus's aligner is a 2-layer 'mlp')")
        else:
            if not c.connector.bias:
                problems.append("the MLP has no biases (Janus's aligner has them)")
            if (c.connector.hidden_size or width) != width:
                problems.append("the MLP's hidden width differs from the LLM width (Janus's aligner keeps it equal)")
            if c.encoder.kind == "janus" and c.connector.act != model.encoder.tower.config.hidden_act:
                problems.append(f"the MLP's activation is {c.connector.act!r} (Janus's aligner uses the tower's, "
                                f"{model.encoder.tower.config.hidden_act!r})")
        tok = c.image_tokenizer
        if tok is None or tok.kind != "janus":
            problems.append(f"the image tokenizer is {tok.kind if tok else None!r} (Janus draws in a 'janus' VQ model)")
        elif model.image_tokenizer.grid != model.encoder.grid:
            problems.append(f"the VQ model draws {model.image_tokenizer.grid} codes and the tower reads "
                            f"{model.encoder.grid} patches (Janus has one grid for both)")
        if c.generation.kind != "decoupled":
            problems.append(f"the generation is {c.generation.kind!r} (Janus's is 'decoupled')")
        elif (c.generation.head_hidden or width) != width:
            problems.append(f"the generation head is {c.generation.head_hidden} wide (Janus's is the LLM's, {width})")
        if (c.tokenizer.image_begin, c.tokenizer.image_end) != (c.generation.begin_token, c.generation.end_token):
            problems.append(f"a shown image is not enclosed in {c.generation.begin_token} ... "
                            f"{c.generation.end_token} as a drawn one is (Janus encloses both; set "
                            f"model.tokenizer.image_begin / image_end)")
        if c.generation.kind == "decoupled" and c.generation.null_prompt != "padded":
            problems.append(f"the null prompt is {c.generation.null_prompt!r} (Janus guides against 'padded' ones)")
        if c.generation.row_end_token:
            problems.append("drawn rows end with a token (Janus writes codes only)")
        if problems:
            raise ExportError("cannot export as janus: " + "; ".join(problems))

    def hf_config(self, model: FusionLM) -> JanusConfig:
        width = model.llm.config.hidden_size
        codes = model.image_tokenizer.grid[0] * model.image_tokenizer.grid[1]
        vision = {**model.encoder.tower.config.to_dict(), "projection_dim": width, "depth": 2,
                  "num_image_tokens": codes}
        vq = {**model.image_tokenizer.vq.config.to_dict(), "projection_dim": width, "image_token_embed_dim": width,
              "num_hidden_layers": 2, "hidden_act": "gelu"}
        return JanusConfig(vision_config=vision, vq_config=vq, text_config=model.llm.config.to_dict(),
                           image_token_id=model.ids.image, tie_word_embeddings=model.llm.config.tie_word_embeddings)

    def processor(self, model: FusionLM, tokenizer) -> JanusProcessor:
        enc = model.config.encoder
        if enc.preprocess == "hf":
            images = hf_image_processor(enc.processor)
        else:  # letterbox ≈ resize the long side, pad to a square (the fill colour is the mean, not fusionlm's grey)
            images = JanusImageProcessorPil(size={"height": enc.image_size, "width": enc.image_size},
                                            image_mean=list(model.encoder.mean), image_std=list(model.encoder.std))
        named = {"image_token": model.config.tokenizer.image_token, "boi_token": model.config.generation.begin_token,
                 "eoi_token": model.config.generation.end_token}
        if any(getattr(tokenizer, k, None) != v for k, v in named.items()):
            tokenizer._set_model_specific_special_tokens(special_tokens=named)  # what JanusProcessor reads
        return JanusProcessor(image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                              num_image_tokens=model.encoder.num_tokens)

    def generation_settings(self, model: FusionLM, tokenizer) -> dict:
        # generate(generation_mode="image") keeps BOS and <begin_of_image> in its null rows
        return {"bos_token_id": tokenizer.bos_token_id, "guidance_scale": model.config.generation.cfg,
                "generation_kwargs": {"boi_token_id": model.ids.begin_image}}


register(Janus())
