"""LLaVA (``LlavaForConditionalGeneration``): Method A with a CLIP or SigLIP tower and a 2-layer MLP.

Weight names: ``model.vision_tower`` ↔ ``encoder.tower``, ``model.multi_modal_projector`` ↔
``connector``, ``model.language_model`` ↔ ``llm.model``, ``lm_head`` ↔ ``llm.lm_head``.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

from ..config import ConnectorConfig, EncoderConfig, FusionConfig, LLMConfig, ModelConfig, TokenizerConfig
from ..data.pixels.processing import hf_image_processor
from .. import designs
from ..errors import ConfigError, ExportError
from ..hub import arch_of
from ..model import FusionLM
from .formats import Format, register

TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def encoder_config(vision, *, feature_layer: int, drop_cls: bool, processor: dict[str, Any] | None) -> EncoderConfig:
    """The encoder section for a transformers vision tower config."""
    kind = TOWERS.get(vision.model_type)
    if kind is None:
        raise ConfigError(f"vision tower {vision.model_type!r} is not supported (supported: {', '.join(TOWERS)})")
    return EncoderConfig(
        kind=kind, arch=arch_of(vision), image_size=vision.image_size, patch_size=vision.patch_size,
        hidden_size=vision.hidden_size, num_layers=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
        intermediate_size=vision.intermediate_size, feature_layer=feature_layer, drop_cls=drop_cls,
        preprocess="hf" if processor else "letterbox", processor=processor,
    )


def llm_config(text) -> LLMConfig:
    """The LLM section for a transformers text config (sizes are informative; ``arch`` rebuilds it)."""
    return LLMConfig(
        kind=text.model_type, arch=arch_of(text), hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        intermediate_size=getattr(text, "intermediate_size", 0) or 0,
        max_length=getattr(text, "max_position_embeddings", None) or 2048, vocab_size=text.vocab_size,
        tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


class Llava(Format):
    name, model_type = "llava", "llava"
    renames = [
        ("encoder.tower.", "model.vision_tower."),
        ("connector.", "model.multi_modal_projector."),
        ("llm.model.", "model.language_model."),
        ("llm.lm_head.", "lm_head."),
    ]

    def hf_class(self):
        return LlavaForConditionalGeneration

    def recipe(self, hf_config: LlavaConfig, processor, tokenizer) -> ModelConfig:
        layer = hf_config.vision_feature_layer
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer {layer!r}: only a single feature layer is supported")
        strategy = hf_config.vision_feature_select_strategy
        vision, text = hf_config.vision_config, hf_config.text_config
        if strategy == "default" and TOWERS.get(vision.model_type) != "clip":
            raise ConfigError(f"vision_feature_select_strategy 'default' drops a CLS token that a "
                              f"{vision.model_type} tower does not have")
        return ModelConfig(
            encoder=encoder_config(vision, feature_layer=layer, drop_cls=strategy == "default", processor=processor),
            connector=ConnectorConfig(kind="mlp", hidden_size=text.hidden_size, act=hf_config.projector_hidden_act,
                                      bias=hf_config.multimodal_projector_bias),
            llm=llm_config(text),
            fusion=FusionConfig(kind=designs.Unified.name),
            tokenizer=TokenizerConfig(image_token=tokenizer.convert_ids_to_tokens(hf_config.image_token_id)),
        )

    def check(self, model: FusionLM) -> None:
        c = model.config
        problems = []
        if type(model.design) is not designs.Unified:
            problems.append(f"fusion is {c.fusion.kind!r} (LLaVA puts image tokens in the sequence: 'unified')")
        if c.encoder.kind not in ("clip", "siglip"):
            problems.append(f"the encoder is {c.encoder.kind!r} (LLaVA takes a clip or siglip tower)")
        if c.encoder.resolution is not None:
            problems.append(f"the tower runs at resolution {c.encoder.resolution} with interpolated position "
                            f"embeddings (LLaVA's tower runs at its own size)")
        if c.encoder.stem != "patch":
            problems.append(f"the tower's stem is {c.encoder.stem!r} (LLaVA's tower embeds linear patches)")
        if c.tiling.max_tiles:
            problems.append("images are tiled (LLaVA-1.5 sees each image whole)")
        if c.connector.kind != "mlp":
            problems.append(f"the connector is {c.connector.kind!r} (LLaVA's projector is a 2-layer 'mlp')")
        elif (c.connector.hidden_size or model.llm.config.hidden_size) != model.llm.config.hidden_size:
            problems.append("the MLP's hidden width differs from the LLM width (LLaVA's projector keeps it equal)")
        if problems:
            raise ExportError("cannot export as llava: " + "; ".join(problems))

    def _strategy(self, model: FusionLM) -> str:
        return "default" if model.encoder.has_cls and model.config.encoder.drop_cls else "full"

    def hf_config(self, model: FusionLM) -> LlavaConfig:
        c = model.config
        return LlavaConfig(
            vision_config=model.encoder.tower.config.to_dict(), text_config=model.llm.config.to_dict(),
            image_token_id=model.ids.image, vision_feature_layer=c.encoder.feature_layer,
            vision_feature_select_strategy=self._strategy(model), projector_hidden_act=c.connector.act,
            multimodal_projector_bias=c.connector.bias, image_seq_length=model.encoder.num_tokens,
            tie_word_embeddings=model.llm.config.tie_word_embeddings,
        )

    def processor(self, model: FusionLM, tokenizer) -> LlavaProcessor:
        enc = model.config.encoder
        if enc.preprocess == "hf":
            images = hf_image_processor(enc.processor)
        else:  # letterbox ≈ pad to a square, then resize (the fill colour is the mean, not fusionlm's grey)
            images = LlavaImageProcessorPil(
                do_pad=True, size={"shortest_edge": enc.image_size},
                crop_size={"height": enc.image_size, "width": enc.image_size},
                image_mean=list(model.encoder.mean), image_std=list(model.encoder.std),
            )
        return LlavaProcessor(
            image_processor=images, tokenizer=tokenizer, patch_size=model.encoder.tower.config.patch_size,
            vision_feature_select_strategy=self._strategy(model), chat_template=tokenizer.chat_template,
            image_token=model.config.tokenizer.image_token, num_additional_image_tokens=int(model.encoder.has_cls),
        )


register(Llava())
