"""What trains: exact trainable sets per stage spec, frozen weights bitwise unchanged after real
optimizer steps, and a short run on 4 samples whose loss falls and whose answers come out exactly."""

from __future__ import annotations

import pytest
import torch

from fusionlm.config import TRAINABLE_GROUPS
from fusionlm.errors import ConfigError
from fusionlm.generate import Request, generate
from fusionlm.train.stages import apply_trainable, select_trainable


def _names(model) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def _with_prefix(model, *prefixes: str) -> set[str]:
    return {n for n in _names(model) if n.startswith(prefixes)}


@pytest.mark.parametrize("fusion,spec", [
    ("unified", ["connector"]),
    ("fuyu", ["connector"]),
    # Closed gates give the connector zero gradient: train the gates too so it gets some.
    ("cross_attention", ["connector", "cross_attention"]),
])
def test_frozen_weights_do_not_move(fusion, spec, make_model, make_batch, forward):
    model = make_model(fusion)
    batch = make_batch(model, [("color", 0), ("price", 0), ("text_only", 0)])
    table = []
    params = apply_trainable(model, spec, log=table.append)
    trained = _with_prefix(model, "connector.", "cross_blocks.")
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in trained}
    # The logged table: the connector trainable, every other part frozen, counts per part.
    rows = {line.split()[0]: tuple(int(x.replace(",", "")) for x in line.split()[1:])
            for line in table[0].splitlines()[1:]}
    numel = {part: sum(p.numel() for n, p in model.named_parameters() if model.part_of(n) == part)
             for part in ("encoder", "connector", "llm", "cross_attention")}
    n_trained = sum(p.numel() for p in params)
    expected = {part: (n, 0) if part in spec else (0, n) for part, n in numel.items() if n}
    expected["total"] = (n_trained, sum(numel.values()) - n_trained)
    assert rows == expected

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # moves only by gradient
    model.train()
    for _ in range(3):
        loss = forward(model, batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in trained:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert p.grad is None and not p.requires_grad, name
    assert {id(p) for p in optimizer.state} == {id(p) for p in params}


def test_exact_trainable_sets(make_model):
    model = make_model("cross_attention")
    names = _names(model)
    cross = select_trainable(model, ["cross_attention"])
    assert cross == _with_prefix(model, "cross_blocks.")
    assert {"cross_blocks.0.attn_gate", "cross_blocks.1.ffn_gate", "cross_blocks.1.k_proj.weight"} <= cross
    assert len(cross) == 2 * 13  # per block: 3 norms, q/k/v/o, 2 FFN layers (weight + bias), 2 gates
    assert select_trainable(model, ["encoder", "connector"]) == _with_prefix(model, "encoder.", "connector.")
    assert select_trainable(model, ["llm"]) == _with_prefix(model, "llm.")
    assert "llm.lm_head.weight" not in names  # tied to the embeddings: one parameter, trained once
    assert select_trainable(model, ["all"]) == names
    groups = [select_trainable(model, [g]) for g in ("encoder", "connector", "llm", "cross_attention")]
    assert set().union(*groups) == names and sum(map(len, groups)) == len(names)  # a partition

    layer0 = select_trainable(model, ["llm.model.layers.0.*"])
    assert layer0 == _with_prefix(model, "llm.model.layers.0.") and len(layer0) == 9  # 7 linears + 2 norms
    gates = select_trainable(model, ["cross_blocks.*_gate", "connector"])
    assert gates == {f"cross_blocks.{i}.{g}" for i in "01" for g in ("attn_gate", "ffn_gate")} | _with_prefix(
        model, "connector.")


@pytest.mark.parametrize("spec", [["conector"], ["connector", "llm.model.layers.9.*"]])
def test_selecting_nothing_is_an_error(spec, make_model):
    model = make_model("cross_attention")
    with pytest.raises(ConfigError) as err:
        select_trainable(model, spec, key="stages.1.train")
    message = str(err.value)
    assert message.startswith("stages.1.train: ") and repr(spec[-1]) in message
    assert all(part in message for part in TRAINABLE_GROUPS)
    # Nothing was frozen by the failed call.
    assert all(p.requires_grad for p in model.parameters())


def test_tiny_model_overfits_four_answers(make_model, make_batch, overfit, world, spec_for, tokenizer):
    items = [("color", 0), ("shape", 1), ("color", 2), ("shape", 3)]
    samples = [world.sample(t, "train", i) for t, i in items]
    answers = [s.answers[0] for s in samples]
    assert len(set(answers)) == 4
    model = make_model("unified")
    requests = [Request(s.messages[0]["content"], s.images) for s in samples]
    assert generate(model, tokenizer, requests, spec_for(model), max_new_tokens=4) != answers
    losses = overfit(model, make_batch(model, samples), steps=60, lr=3e-3)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert generate(model, tokenizer, requests, spec_for(model), max_new_tokens=4) == answers
