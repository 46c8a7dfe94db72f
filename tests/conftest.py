"""Shared fixtures for the model tests: one tiny tokenizer, tiny configs for each fusion design,
models built through ``build_model`` and batches built the way training builds them."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from fusionlm.checkpoint import build_model
from fusionlm.config import RecipeConfig, validate
from fusionlm.data.batching.batches import Batch, ImageSpec, collate
from fusionlm.data.batching.packing import Packing
from fusionlm.data.prompt import Prompted
from fusionlm.data.chat import encode
from fusionlm.data.sample import Sample
from fusionlm.data.world import World
from fusionlm.data.tokenizer import train_tokenizer
from fusionlm.model import FusionLM

FUSIONS = ("unified", "cross_attention", "fuyu")
WORLD_SIZE = 32  # side of the synthetic scenes; the encoder sees them letterboxed to 16


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two threads
    contending with another process run the same steps 5-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world() -> World:
    return World(image_size=WORLD_SIZE, seed=0)


@pytest.fixture(scope="session")
def tokenizer(world):
    return train_tokenizer(world.corpus(20), 400)


def tiny_config(fusion: str) -> RecipeConfig:
    """A validated recipe with widths of 32: 16 px images in 4 px patches (a 4x4 grid)."""
    config = RecipeConfig()
    enc = config.model.encoder
    enc.kind = "patches" if fusion == "fuyu" else "siglip"
    enc.image_size, enc.patch_size, enc.hidden_size = 16, 4, 32
    enc.num_layers, enc.num_heads, enc.intermediate_size = 1, 2, 64
    llm = config.model.llm
    llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads = 32, 2, 4, 2
    llm.intermediate_size, llm.max_length = 64, 128
    config.model.fusion.kind = fusion
    config.model.fusion.every_n = 1  # cross_attention: a block before each of the 2 layers
    return validate(config)


@pytest.fixture(name="tiny_config")
def tiny_config_fixture() -> Callable[[str], RecipeConfig]:
    return tiny_config


def spec_for(model: FusionLM) -> ImageSpec:
    tiling = model.config.tiling if model.config.tiling.max_tiles else None
    return ImageSpec(size=model.config.encoder.image_size, mean=model.encoder.mean, std=model.encoder.std,
                     grid=model.encoder.grid, tiling=tiling, frames=model.config.video.frames,
                     temporal_pool=model.config.video.temporal_pool)


@pytest.fixture
def make_model(tokenizer) -> Callable[..., FusionLM]:
    """``make_model(fusion, seed=0, init_std=None)``: a fresh random tiny model in eval mode (no dropout
    anyway). ``init_std`` 0.2 gives answers that differ from prompt to prompt (at the default 0.02
    a random model writes newlines whatever it is asked)."""

    def make(fusion: str, seed: int = 0, init_std: float | None = None) -> FusionLM:
        torch.manual_seed(seed)
        config = tiny_config(fusion)
        if init_std is not None:
            config.model.llm.init_std = init_std
        model = build_model(config, tokenizer)
        return model.eval()

    return make


def make_batch(model: FusionLM, tokenizer, samples: list[Sample], pack: Packing | None = None) -> Batch:
    """Encode + collate ``samples`` for ``model``'s image layout, exactly as ``MixtureBatches`` does
    (``pack``: into packed rows)."""
    spec = spec_for(model)
    prompted = []
    for s in samples:
        per_image = [spec.process_all(img) for img in s.images]
        encoded = encode(s, tokenizer, [model.layout.image_tokens(p) for p in per_image],
                         max_length=model.config.llm.max_length, end_token=model.config.tokenizer.end_token)
        prompted.append(Prompted(encoded, [inp for inputs in per_image for inp in inputs]))
    return collate(prompted, [s.task for s in samples], [], tokenizer.pad_token_id,
                   pack=pack)


@pytest.fixture(name="make_batch")
def make_batch_fixture(tokenizer, world) -> Callable[..., Batch]:
    """``make_batch(model, [(task, index), ...] or [Sample, ...])`` from the world's train split."""

    def make(model: FusionLM, items, pack: Packing | None = None) -> Batch:
        samples = [it if isinstance(it, Sample) else world.sample(it[0], "train", it[1]) for it in items]
        return make_batch(model, tokenizer, samples, pack)

    return make


@pytest.fixture(name="spec_for")
def spec_for_fixture() -> Callable[[FusionLM], ImageSpec]:
    return spec_for


def forward(model: FusionLM, batch: Batch, **kwargs):
    return model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                 labels=batch.labels, **kwargs)


@pytest.fixture(name="forward")
def forward_fixture():
    return forward


def overfit(model: FusionLM, batch: Batch, *, steps: int, lr: float = 3e-3) -> list[float]:
    """AdamW on every parameter of ``model`` over one fixed batch; returns the loss per step."""
    model.train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = forward(model, batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(name="overfit")
def overfit_fixture():
    return overfit


@pytest.fixture
def no_end():
    """``no_end(model)``: the end token never wins, so every call decodes its full budget of real
    tokens; undone after the test (models may be shared between tests)."""
    handles = []

    def apply(model) -> None:
        never = torch.tensor([model.ids.end])
        hook = lambda module, args, logits: logits.index_fill(-1, never, float("-inf"))  # noqa: E731
        handles.append(model.llm.lm_head.register_forward_hook(hook))

    yield apply
    for handle in handles:
        handle.remove()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny random unified model whose answers differ from picture to picture (``init_std``
    0.2; at 0.02 a random model writes newlines): what the serving tests serve."""
    from fusionlm.checkpoint import save_model

    config = tiny_config("unified")
    config.model.llm.init_std = 0.2
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    return save_model(model.eval(), tokenizer, config, tmp_path_factory.mktemp("serve") / "tiny")
