"""What a recipe implies before any step runs: the tasks it trains on and the tokenizer it uses."""

from __future__ import annotations

from .checkpoint import added_tokens, needs_newline
from .config import RecipeConfig
from .data.batching.batches import check_mixture
from .data.tokenizer import add_tokens, load_any_tokenizer, load_tokenizer, prepare_tokenizer, train_tokenizer


def make_tokenizer(config: RecipeConfig, source):
    """A saved tokenizer; else the LLM's own (made ready for images); else one trained on the data."""
    tcfg, llm = config.model.tokenizer, config.model.llm
    if tcfg.path and llm.hf is None:
        tok = load_tokenizer(tcfg.path)
    elif tcfg.path or llm.hf:
        tok = load_any_tokenizer(tcfg.path or llm.hf, allow_custom_code=llm.allow_custom_code)
        tok = prepare_tokenizer(tok, image_token=tcfg.image_token, newline_token=tcfg.newline_token,
                                need_newline=needs_newline(config.model))
    else:
        tok = train_tokenizer(source.corpus(tcfg.corpus_per_task, trained_tasks(config, source)), tcfg.vocab_size)
    return add_tokens(tok, added_tokens(config.model))


def trained_tasks(config: RecipeConfig, source) -> list[str]:
    """The tasks some stage of the recipe trains on."""
    tasks = set()
    for i, stage in enumerate(config.stages):
        mixture = check_mixture(stage.mixture, source, key=f"stages.{i}.mixture")
        tasks.update(t for t, w in mixture.items() if w > 0)
    return sorted(tasks)
