"""How much padding packing saves on a recipe's batches.

    python experiments/packing_savings.py [RECIPE] [STAGE] [BATCHES]

Builds the stage's first batches twice, one sample per row and packed (``data.batching.packing``),
and prints the share of padding positions in each and what the rows cost (``Packing.cost``).
"""

from __future__ import annotations

import sys

from fusionlm.checkpoint import build_model
from fusionlm.config import load_recipe
from fusionlm.data.batching.batches import MixtureBatches
from fusionlm.data.batching.packing import Packing
from fusionlm.data.pixels.processing import ImageSpec
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.sources import build_source
from fusionlm.recipe import make_tokenizer


def main(recipe: str = "demo", stage: int = 2, n: int = 20) -> None:
    config = load_recipe(recipe)
    source = build_source(config.data)
    tokenizer = make_tokenizer(config, source)
    model = build_model(config, tokenizer)
    spec = ImageSpec.for_model(model, config, root=source.root)
    s = config.stages[stage]
    price = Packing(config.model.llm.max_length, model.llm.config.hidden_size)  # what rows cost
    for pack in (None, Packing(config.model.llm.max_length, model.llm.config.hidden_size)):
        data = MixtureBatches(source, s.mixture, seed=0, stage=stage, batch_size=s.batch_size,
                              prompts=PromptEncoder.of(model, tokenizer, spec), pack=pack)
        cells = tokens = rows = cost = 0
        for k in range(n):
            b = data[k]
            cells, tokens, rows = cells + b.input_ids.numel(), tokens + b.num_tokens, rows + b.input_ids.shape[0]
            cost += price.cost(*b.input_ids.shape)
        print(f"{'packed' if pack else 'one sample per row'}: {rows / n:.1f} rows of {cells / rows:.0f} positions "
              f"per batch, padding {1 - tokens / cells:.1%}, cost {cost / n:,.0f} position-products per batch")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["demo"]), *(int(a) for a in sys.argv[2:4]))
