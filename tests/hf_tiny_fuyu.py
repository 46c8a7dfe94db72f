"""A tiny random Fuyu checkpoint (``FuyuForCausalLM`` + ``FuyuProcessor``), written with ``save_pretrained``.

The tokenizer is built like adept/fuyu-8b's: a Unigram model behind a normalizer that prepends
"▁" and turns spaces into "▁", with ``|SPEAKER|``, ``|NEWLINE|``, ``<s>`` and ``<0x04>`` (the
beginning of an answer) as ordinary pieces of the model's vocabulary and only ``<unk>`` and
``|ENDOFTEXT|`` as added tokens. That is what ``FuyuProcessor`` relies on: it drops the first
token of its encoded image placeholders, the "▁" the normalizer puts before them.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_tiny import CORPUS

UNK, END = "<unk>", "|ENDOFTEXT|"
PIECES = ["<s>", "|SPEAKER|", "|NEWLINE|", "<0x04>"]  # in the vocabulary, as in Fuyu's sentencepiece model
CANVAS = {"height": 32, "width": 48}  # the image processor's target size (Fuyu-8b: 1080 x 1920)
PATCH = 4


def fuyu_tokenizer(vocab_size: int = 160) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[UNK, END], unk_token=UNK,
                                      initial_alphabet=list(string.printable.strip()), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]  # [[piece, log-probability]], the two added tokens first
    data["model"]["vocab"] = vocab[:2] + [[p, 0.0] for p in PIECES] + vocab[2:]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), unk_token=UNK,
                                   bos_token=END, eos_token=END)


def fuyu_checkpoint(path: Path, *, seed: int = 0) -> Path:
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessorPil, FuyuProcessor, PersimmonConfig

    tokenizer = fuyu_tokenizer()
    text = PersimmonConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=1)
    config = FuyuConfig(text_config=text, patch_size=PATCH, image_size=CANVAS["height"],
                        image_token_id=tokenizer.convert_tokens_to_ids("|SPEAKER|"))
    torch.manual_seed(seed)
    model = FuyuForCausalLM(config).eval()
    with torch.no_grad():  # a random init this small barely looks at the patches: make them count
        model.model.vision_embed_tokens.weight.normal_(std=0.3)
    model.save_pretrained(path)
    images = FuyuImageProcessorPil(size=CANVAS, patch_size={"height": PATCH, "width": PATCH})
    FuyuProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return Path(path)
