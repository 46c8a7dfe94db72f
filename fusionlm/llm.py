"""The language model: any Hugging Face causal LM, a tiny random config of the same class by default."""

from __future__ import annotations

from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, PreTrainedModel

from .config import LLMConfig
from .errors import ConfigError
from .registry import Registry

LLMS: Registry[type] = Registry("LLM", "model.llm.kind")

LLMS.register("llama")(LlamaConfig)
LLMS.register("qwen2")(Qwen2Config)


def build_llm(config: LLMConfig, *, pad_token_id: int) -> PreTrainedModel:
    """A causal LM from ``config``: pretrained when ``hf`` is set, else a random init of ``kind``."""
    if config.hf:
        return AutoModelForCausalLM.from_pretrained(config.hf, trust_remote_code=False)
    config_cls = LLMS.get(config.kind)
    if config.vocab_size is None:
        raise ConfigError("model.llm.vocab_size: not set (it is filled in from the tokenizer)")
    hf_config = config_cls(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_length, tie_word_embeddings=config.tie_embeddings,
        pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None,
        initializer_range=config.init_std,
    )
    return AutoModelForCausalLM.from_config(hf_config)


def decoder_layers(llm: PreTrainedModel) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama/Qwen2/Mistral: ``model.layers``)."""
    body = llm.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"model.llm: cannot find the decoder layers of {type(llm).__name__}")
