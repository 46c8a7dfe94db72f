"""Does the question fail because the image tokens cannot see it? Train with prefix-LM attention.

PaliGemma's prefix-LM: the prompt (image and question) attends to itself both ways, the answer
causally. With it the image tokens can read the question that names what to find. This wraps
``FusionLM.forward`` for training batches only (``labels`` given; the prefix of each sample is
everything before its first target token) and runs ``fusionlm train`` with the rest of the
command line; the product is not changed. Compare the position stage's loss with the causal run:

    .venv/bin/python experiments/reading/prefix_attention.py experiments/reading/position.yaml --out runs/position/prefix
    .venv/bin/fusionlm train experiments/reading/position.yaml --out runs/position/mlp
    .venv/bin/python experiments/reading/prefix_attention.py --loss runs/position/mlp runs/position/prefix

(Generation is not wrapped, so only the training loss is compared.)
"""

from __future__ import annotations

import json
import sys

import torch

from fusionlm.data.batching.packing import segment_mask, segment_positions
from fusionlm.model import FusionLM


def prefix_mask(segments: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: within a segment, causal, and every position sees its segment's
    prefix (the positions before the segment's first target): the prefix is one attention block."""
    t = segments.shape[1]
    idx = torch.arange(t, device=segments.device).expand_as(segments)  # (B, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    targets = (labels != -100)[:, None, :] & same  # (B, T, T): j is a target of i's segment
    first = torch.where(targets, idx[:, None, :], t).min(-1).values  # (B, T): first target of each one's segment
    return segment_mask(segments, dtype, blocks=torch.where(idx < first, segments, 0))  # (B, 1, T, T)


def patch() -> None:
    forward = FusionLM.forward

    def prefixed(self, input_ids, *, labels=None, segment_ids=None, attention_mask=None, position_ids=None, **kw):
        if labels is None:
            return forward(self, input_ids, labels=labels, segment_ids=segment_ids, attention_mask=attention_mask,
                           position_ids=position_ids, **kw)
        segments = segment_ids if segment_ids is not None else attention_mask.long()
        if segment_ids is not None:
            position_ids = segment_positions(segment_ids)
        mask = prefix_mask(segments, labels, self.llm.get_input_embeddings().weight.dtype)
        # segment ids are dropped so that the forward pass takes this mask (and the positions above)
        return forward(self, input_ids, labels=labels, attention_mask=mask, position_ids=position_ids, **kw)

    FusionLM.forward = prefixed


def losses(run: str, every: int = 100) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    lm = [r for r in rows if r.get("stage_name") != "align"]
    return [(r["step"], round(sum(x["loss"] for x in lm[i:i + every]) / len(lm[i:i + every]), 3))
            for i, r in enumerate(lm) if i % every == 0]


if __name__ == "__main__":
    if sys.argv[1] == "--loss":
        for run in sys.argv[2:]:
            print(run, losses(run))
    else:
        patch()
        from fusionlm.cli import main
        sys.argv = ["fusionlm", "train", *sys.argv[1:]]
        main()
