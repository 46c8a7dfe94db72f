"""Llama 3.2 Vision (``MllamaForConditionalGeneration``): Method B with a tiled tower and the
decoder's own gated cross-attention layers.

Weight names: ``model.vision_model`` ↔ ``encoder.tower``, ``model.multi_modal_projector`` ↔
``connector.proj``, ``model.language_model`` ↔ ``llm.model``, ``lm_head`` ↔ ``llm.lm_head``. The
LLM is transformers' ``MllamaForCausalLM`` itself (its embedding table has 8 rows more than its
LM head, and its cross-attention layers sit among the self-attention ones), so no weight changes
shape on the way in or out.
"""

from __future__ import annotations

from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

from ..config import ConnectorConfig, EncoderConfig, FusionConfig, ModelConfig, TokenizerConfig
from ..data.pixels.processing import hf_image_processor
from .. import designs
from ..errors import ConfigError, ExportError
from ..hub import arch_of
from ..model import FusionLM
from .formats import Format, register
from .llava import llm_config

IMAGE_TOKEN = "<|image|>"  # the token MllamaProcessor looks for


class Mllama(Format):
    name, model_type = "mllama", "mllama"
    renames = [
        ("encoder.tower.", "model.vision_model."),
        ("connector.proj.", "model.multi_modal_projector."),
        ("llm.model.", "model.language_model."),
        ("llm.lm_head.", "lm_head."),
    ]

    def hf_class(self):
        return MllamaForConditionalGeneration

    def recipe(self, hf_config: MllamaConfig, processor, tokenizer) -> ModelConfig:
        vision, text = hf_config.vision_config, hf_config.text_config
        if not processor or not str(processor.get("image_processor_type", "")).startswith("Mllama"):
            raise ConfigError("a Llama 3.2 Vision checkpoint needs its MllamaImageProcessor settings "
                              "(preprocessor_config.json or processor_config.json) to cut images into tiles")
        encoder = EncoderConfig(
            kind="mllama", arch=arch_of(vision), image_size=vision.image_size, patch_size=vision.patch_size,
            hidden_size=vision.hidden_size, num_layers=vision.num_hidden_layers, num_heads=vision.attention_heads,
            intermediate_size=vision.intermediate_size, preprocess="hf", processor=processor,
        )
        return ModelConfig(
            encoder=encoder,
            connector=ConnectorConfig(kind="linear", hidden_size=text.hidden_size, bias=True),
            llm=llm_config(text),
            fusion=FusionConfig(kind=designs.CrossAttention.name, visibility="latest"),
            tokenizer=TokenizerConfig(image_token=tokenizer.convert_ids_to_tokens(hf_config.image_token_id)),
        )

    def check(self, model: FusionLM) -> None:
        c = model.config
        problems = []
        if type(model.design) is not designs.CrossAttention:
            problems.append(f"fusion is {c.fusion.kind!r} (Llama 3.2 Vision reaches images through "
                            f"cross-attention: 'cross_attention')")
        elif not model.native_cross:
            problems.append(f"the LLM is a {type(model.llm).__name__} with fusionlm's own gated cross-attention "
                            f"blocks (Llama 3.2 Vision's cross-attention layers belong to its MllamaForCausalLM "
                            f"decoder)")
        if type(model.design) is designs.CrossAttention and c.fusion.visibility != "latest":
            problems.append(f"fusion visibility is {c.fusion.visibility!r} (MllamaProcessor lets text see only "
                            f"the latest image: 'latest')")
        if c.encoder.kind != "mllama":
            problems.append(f"the encoder is {c.encoder.kind!r} (Llama 3.2 Vision takes its tiled 'mllama' tower)")
        elif c.encoder.preprocess != "hf" or not str((c.encoder.processor or {}).get("image_processor_type",
                                                                                    "")).startswith("Mllama"):
            problems.append("images are not cut into tiles by an MllamaImageProcessor (encoder preprocess 'hf')")
        if c.connector.kind != "linear" or not c.connector.bias:
            what = c.connector.kind if c.connector.kind != "linear" else "linear without bias"
            problems.append(f"the connector is {what!r} (Llama 3.2 Vision's projector is one 'linear' layer "
                            f"with bias)")
        if c.tokenizer.image_token != IMAGE_TOKEN:
            problems.append(f"the image token is {c.tokenizer.image_token!r} (MllamaProcessor's is {IMAGE_TOKEN!r})")
        if problems:
            raise ExportError("cannot export as mllama: " + "; ".join(problems))

    def hf_config(self, model: FusionLM) -> MllamaConfig:
        return MllamaConfig(vision_config=model.encoder.tower.config.to_dict(),
                            text_config=model.llm.config.to_dict(), image_token_id=model.ids.image)

    def processor(self, model: FusionLM, tokenizer) -> MllamaProcessor:
        images = hf_image_processor(model.config.encoder.processor)
        return MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


register(Mllama())
