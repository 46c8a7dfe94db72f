"""The tokenizer: byte-level BPE trained locally with `tokenizers`, special tokens and a chat template.

It is wrapped as a transformers ``PreTrainedTokenizerFast`` so it saves, loads and applies its chat
template exactly like a pretrained LLM's tokenizer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import ConfigError
from .sample import IMAGE_TOKEN

PAD, END, USER, ASSISTANT, SYSTEM = "<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
IMAGE_NEWLINE = "<image_newline>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM, IMAGE_TOKEN, IMAGE_NEWLINE]

# Rendering of a conversation; ``fusionlm.data.chat`` produces the same string piece by piece.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``corpus``; any text stays encodable through the byte alphabet."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=END,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM, IMAGE_TOKEN, IMAGE_NEWLINE],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str | Path, required: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A saved tokenizer; ``required``: tokens it must have (default: all of fusionlm's own)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{path}: no tokenizer.json here")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    missing = [t for t in (SPECIAL_TOKENS if required is None else required) if t not in tok.get_vocab()]
    if missing:
        raise ConfigError(f"{path}: tokenizer lacks the special tokens {missing}")
    return tok


def special_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


# ----------------------------------------------------------------------------- any LLM's tokenizer


def prepare_tokenizer(tok, *, image_token: str, newline_token: str, need_newline: bool):
    """Make an LLM's own tokenizer ready for images: placeholder tokens, padding, a chat template.

    Missing image tokens are added as special tokens (the caller resizes the embeddings). A
    tokenizer without a chat template gets fusionlm's, with its role tokens added.
    """
    wanted = [image_token] + ([newline_token] if need_newline else [])
    if not tok.chat_template:
        wanted += [USER, ASSISTANT, SYSTEM, END]
        tok.chat_template = CHAT_TEMPLATE
    add_tokens(tok, wanted)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else PAD
        if tok.pad_token == PAD and PAD not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": PAD})
    return tok


def add_tokens(tok, tokens: list[str]):
    """``tok`` with those of ``tokens`` it lacks added as special tokens, at the end of its vocabulary
    (so the ids it had stay as they were; the caller grows the embeddings)."""
    new = [t for t in tokens if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


def load_any_tokenizer(source: str | Path, *, allow_custom_code: bool = False):
    """A saved or pretrained tokenizer (a directory or a hub id), without running its own code."""
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=allow_custom_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
