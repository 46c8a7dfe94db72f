"""The language model: any Hugging Face causal LM, a tiny random config of the same class by default.

Three ways to build one, in this order: the recorded ``arch`` (a checkpoint being reloaded, or an
imported model: random init of the exact architecture, weights come from the checkpoint),
``hf`` (pretrained weights, a hub id or a local directory), or ``kind`` and the sizes of the
recipe (a random init for experiments).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import (
    AutoModelForCausalLM, Emu3ForCausalLM, GPT2Config, LlamaConfig, MllamaForCausalLM, PretrainedConfig,
    PreTrainedModel, Qwen2Config,
)

from .config import LLMConfig
from .errors import ConfigError
from .hub import arch_of, config_from_arch, load_pretrained, torch_dtype
from .registry import Registry

LLMS: Registry[type] = Registry("LLM", "model.llm.kind")

LLMS.register("llama")(LlamaConfig)
LLMS.register("qwen2")(Qwen2Config)
LLMS.register("gpt2")(GPT2Config)

# Text models that transformers' auto classes do not map to a causal LM from their own config.
CAUSAL_LM_FOR = {"mllama_text_model": MllamaForCausalLM, "emu3_text_model": Emu3ForCausalLM}


def _random_config(config: LLMConfig, pad_token_id: int) -> PretrainedConfig:
    config_cls = LLMS.get(config.kind)
    if config.vocab_size is None:
        raise ConfigError("model.llm.vocab_size: not set (it is filled in from the tokenizer)")
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
                  pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None, initializer_range=config.init_std)
    if config_cls is GPT2Config:
        return GPT2Config(n_embd=config.hidden_size, n_inner=config.intermediate_size, n_layer=config.num_layers,
                          n_head=config.num_heads, n_positions=config.max_length, **common)
    return config_cls(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_length, **common,
    )


def from_config(hf_config: PretrainedConfig, dtype: str) -> PreTrainedModel:
    """A randomly initialised causal LM of exactly this architecture."""
    model_cls = CAUSAL_LM_FOR.get(hf_config.model_type)
    if model_cls is not None:
        return model_cls._from_config(hf_config, dtype=torch_dtype(dtype))
    try:
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(dtype))
    except ValueError as exc:
        raise ConfigError(f"model.llm: {hf_config.model_type!r} is not a causal LM transformers knows ({exc})") from None


def build_llm(config: LLMConfig, *, pad_token_id: int, pretrained: bool = True) -> PreTrainedModel:
    """A causal LM for ``config``; records ``config.arch`` when it comes from ``hf``.

    ``pretrained=False`` (reloading a checkpoint) never reads ``hf``: the recorded ``arch`` suffices.
    """
    if config.arch is not None and not (pretrained and config.hf):
        return from_config(config_from_arch(config.arch, key="model.llm.arch"), config.dtype)
    if config.hf:
        llm = load_pretrained(AutoModelForCausalLM, config.hf, dtype=config.dtype,
                              allow_custom_code=config.allow_custom_code, key="model.llm.hf")
        config.arch = arch_of(llm.config)
        return llm
    return from_config(_random_config(config, pad_token_id), config.dtype)


def decoder_layers(llm: PreTrainedModel) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama/Qwen2/Mistral: ``model.layers``, GPT-2: ``h``)."""
    body = llm.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"model.llm: cannot find the decoder layers of {type(llm).__name__}")


@dataclass
class Dims:
    """The sizes a cross-attention block takes from its LLM, whatever the family calls them."""

    hidden: int
    heads: int
    kv_heads: int
    ffn: int


def dims(hf_config: PretrainedConfig) -> Dims:
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    ffn = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden
    return Dims(hidden, heads, kv, ffn)


def is_mllama_text(llm: PreTrainedModel) -> bool:
    """Llama 3.2 Vision's decoder: its cross-attention layers are its own (not fusionlm's blocks)."""
    return isinstance(llm, MllamaForCausalLM)
