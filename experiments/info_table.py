"""One row per shipped recipe of what `fusionlm info` reports: the table in docs/design_space.md.

    python experiments/info_table.py [RECIPE ...]
"""

from __future__ import annotations

import sys

from fusionlm.config import load_recipe, shipped_recipes
from fusionlm.info import PARTS, report


def main(names: list[str]) -> None:
    print("| recipe | design | parameters | encoder tokens / image | decoder positions / image | typical sample "
          "(tokens) | forward MFLOPs / sample: encoder · connector · cross-attn · LLM | last stage train MFLOPs / sample |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for name in names:
        r = report(load_recipe(name), name=name)
        fwd = " · ".join(f"{r.forward.get(p, 0.0) / 1e6:.1f}" for p in PARTS)
        last = sum(list(r.training.values())[-1].values()) / 1e6
        print(f"| `{name}` | {r.design} | {sum(r.params.values()):,} | {r.encoder_tokens} | {r.decoder_tokens} | "
              f"{r.sample_length:.0f} | {fwd} | {last:.1f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or [n for n in shipped_recipes() if n != "finetune"])
