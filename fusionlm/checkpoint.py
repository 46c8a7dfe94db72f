"""A model on disk: safetensors weights + the config it was built from + its tokenizer.

A checkpoint directory is complete or absent: it is written under a temporary name and renamed
into place, so a crash (even ``kill -9``) mid-write leaves the previous checkpoint as the latest.
One that replaces a checkpoint of the same name sets the old one aside first and deletes it only
once the new one is in place; ``recover_checkpoints`` puts it back if a kill came in between.
Loading reads safetensors only (no pickle, no code) and checks every key and shape.

A training run may instead write its weights as shards (``train.checkpoint_format: sharded``):
each process writes its own part into ``SHARDED/`` with ``torch.distributed.checkpoint``, nothing
gathered on one process; such a checkpoint loads on any number of processes (its shards are
re-split) and ``fusionlm export`` turns it into one whole file.
"""

from __future__ import annotations

from dataclasses import replace
import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import (
    GenerationConfig, ModelConfig, RecipeConfig, TilingConfig, TokenizerConfig, load_config, save_config,
)
from .data.chat import end_of_turn
from .data.layout import SpecialIds
from .data.tokenizer import load_tokenizer
from .designs import design_of
from .generators import generator_of
from .errors import CheckpointError, ConfigError, first_line
from .device import resolve_device
from . import lora
from .model import FusionLM

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.yaml", "tokenizer"
SHARDED = "sharded"  # torch.distributed.checkpoint's folder: each process's shards, then its .metadata
STEP_DIR = re.compile(r"^step-(\d+)$")


TILE_TAG, THUMBNAIL_TAG = "<tile_{}>", "<tile_global_thumbnail>"  # NVLM's tile tags, as plain text


def tile_tags(tokenizer, tiling: TilingConfig | None) -> tuple[tuple[int, ...], ...]:
    """Token ids of the text tags that precede each tile and the thumbnail (NVLM-D)."""
    if tiling is None or not tiling.max_tiles or tiling.marker != "tags":
        return ()
    texts = [TILE_TAG.format(k) for k in range(1, tiling.max_tiles + 1)] + [THUMBNAIL_TAG]
    return tuple(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def needs_newline(model: ModelConfig) -> bool:
    """Whether the image-newline token is used: Fuyu's rows, or tiles marked by a newline."""
    return design_of(model.fusion.kind).sequence.newline or (model.tiling.max_tiles > 0 and model.tiling.marker == "newline")


# SpecialIds field -> the model.generation key naming its token
DRAWING_TOKENS = {"begin_image": "begin_token", "end_image": "end_token", "code": "code_token",
                  "row_end": "row_end_token", "header": "header_token", "frame_end": "frame_end_token"}


def _drawing(generation: GenerationConfig | None) -> dict[str, str]:
    """{SpecialIds field: token} of the tokens a model that draws writes an image with; none for one
    that reads (or an unset ``row_end_token``, ``header_token``, ``frame_end_token``)."""
    if generation is None or not generator_of(generation.kind).draws:
        return {}
    return {f: getattr(generation, k) for f, k in DRAWING_TOKENS.items() if getattr(generation, k)}


def _bracket(tcfg: TokenizerConfig) -> dict[str, str]:
    """{SpecialIds field: token} of the tokens around each image a prompt shows; none if unset."""
    if (tcfg.image_begin is None) != (tcfg.image_end is None):
        raise ConfigError("model.tokenizer.image_begin / image_end: set both or neither")
    return {"image_begin": tcfg.image_begin, "image_end": tcfg.image_end} if tcfg.image_begin else {}


def added_tokens(model: ModelConfig) -> list[str]:
    """The tokens a recipe adds to any tokenizer that lacks them, beyond the image and newline tokens:
    those around a shown image (``model.tokenizer.image_begin`` / ``image_end``) and a drawn one's."""
    return list(dict.fromkeys([*_bracket(model.tokenizer).values(), *_drawing(model.generation).values()]))


def special_ids(tokenizer, tcfg: TokenizerConfig, *, need_newline: bool,
                tiling: TilingConfig | None = None, generation: GenerationConfig | None = None) -> SpecialIds:
    """The ids of the image, newline, pad and end-of-turn tokens (``tcfg.end_token`` set), and of a
    model that draws, its image tokens (``generation``)."""
    vocab = tokenizer.get_vocab()
    wanted = {"model.tokenizer.image_token": tcfg.image_token, "model.tokenizer.end_token": tcfg.end_token}
    if need_newline:
        wanted["model.tokenizer.newline_token"] = tcfg.newline_token
    drawing = _drawing(generation)
    wanted.update({f"model.generation.{DRAWING_TOKENS[f]}": token for f, token in drawing.items()})
    bracket = _bracket(tcfg)
    wanted.update({f"model.tokenizer.{f}": token for f, token in bracket.items()})
    for key, token in wanted.items():
        if token not in vocab:
            raise ConfigError(f"{key}: the tokenizer has no token {token!r}")
    newline = vocab.get(tcfg.newline_token, vocab[tcfg.image_token])
    if tokenizer.pad_token_id is None:
        raise ConfigError("model.tokenizer: the tokenizer has no padding token")
    bos = tokenizer.bos_token_id
    return SpecialIds(image=vocab[tcfg.image_token], newline=newline, pad=tokenizer.pad_token_id,
                      bos=-1 if bos is None else bos,
                      end=vocab[tcfg.end_token], tile_tags=tile_tags(tokenizer, tiling),
                      **{f: vocab[token] for f, token in {**drawing, **bracket}.items()})


def build_model(config: RecipeConfig, tokenizer, *, pretrained: bool = True) -> FusionLM:
    """A model for ``config`` and ``tokenizer``.

    ``config`` stays as given: the model's own ``model.config`` records what the build settled (a
    random LLM's vocabulary sized from the tokenizer, the end-of-turn token read off its chat
    template, the architecture of ``hf`` parts), and ``save_model`` writes that. A pretrained or
    recorded LLM keeps its vocabulary, grown if the tokenizer gained tokens (the image token).
    ``pretrained=False`` builds ``hf`` parts from their recorded architecture without their
    weights (a checkpoint's weights are loaded next).
    """
    llm = config.model.llm
    own = llm.hf is None and llm.arch is None
    if own and llm.vocab_size is not None and llm.vocab_size != len(tokenizer):
        raise ConfigError(f"model.llm.vocab_size: {llm.vocab_size}, but the tokenizer has {len(tokenizer)} tokens")
    settled = replace(config.model,
                      llm=replace(llm, vocab_size=len(tokenizer)) if own else llm,
                      tokenizer=replace(config.model.tokenizer,
                                        end_token=config.model.tokenizer.end_token or end_of_turn(tokenizer)))
    ids = special_ids(tokenizer, settled.tokenizer, need_newline=needs_newline(settled), tiling=settled.tiling,
                      generation=settled.generation)
    model = FusionLM(settled, ids, pretrained=pretrained, vocab_size=None if own else len(tokenizer))
    if model.draws and settled.generation.size_header:  # the grid is settled once the image tokenizer is built
        rows, cols = model.image_tokenizer.grid
        model.ids = replace(ids, size_text=tuple(tokenizer(f"{rows}*{cols}", add_special_tokens=False)["input_ids"]))
    return model


def _unique_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without aliases of tied tensors (safetensors stores each storage once)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel():
            continue
        seen.add(ptr)
        out[name] = tensor.contiguous()
    return out


def save_model(model: FusionLM, tokenizer, config: RecipeConfig, path: str | Path, *, extra=None,
               state: dict[str, torch.Tensor] | None = None, staged: Path | None = None) -> Path:
    """Write weights, config and tokenizer to ``path`` atomically; ``extra(tmp_dir)`` adds files.
    ``state``: the weights to write, when not ``model.state_dict()`` (gathered from shards).
    ``staged``: a folder from ``staging(path)`` that holds the weights already, as ``SHARDED``."""
    path = Path(path)
    tmp = staged if staged is not None else staging(path)
    if staged is None:
        # mid LoRA stage: the unmerged adapter state, with the settings a loader re-injects them from
        meta = {"format": "pt", "fusionlm": "1", **lora.metadata(model)}
        save_file(_unique_state(model.state_dict() if state is None else state), str(tmp / WEIGHTS), metadata=meta)
    save_config(replace(config, model=model.config), tmp / CONFIG)  # the model as built (``build_model``)
    tokenizer.save_pretrained(str(tmp / TOKENIZER))
    if extra is not None:
        extra(tmp)
    _fsync_tree(tmp)
    if path.exists():  # the old one is set aside, not deleted, until the new one is in its place
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def staging(path: str | Path) -> Path:
    """A new, empty temporary folder beside ``path``, where the checkpoint for ``path`` is written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint's weights: one safetensors file or a finished set of shards."""
    return (path / WEIGHTS).is_file() or (path / SHARDED / ".metadata").is_file()


def recover_checkpoints(run_dir: str | Path) -> None:
    """Tidy what a killed run left in ``run_dir/checkpoints``: half-written checkpoints (never
    complete, never read) are deleted; a checkpoint set aside by a swap the kill cut short goes
    back into place when its replacement never arrived, and is deleted when it did."""
    folder = Path(run_dir) / "checkpoints"
    for tmp in folder.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in folder.glob(".step-*.old-*"):
        path = folder / old.name[1:].rsplit(".old-", 1)[0]
        if is_complete(path):
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(old, path)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def load_weights(model: torch.nn.Module, file: str | Path) -> None:
    """Load safetensors weights, refusing missing/unexpected keys and wrong shapes by name.

    Weights saved mid LoRA stage hold unmerged adapters: they are injected into ``model`` first
    (``lora.merge(model)`` folds them in afterwards; ``load_model`` does)."""
    try:
        state = load_file(str(file))
        with safe_open(str(file), "pt") as fh:
            meta = fh.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    try:
        lora.prepare_load(model, meta, state)
    except (ConfigError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot re-create its LoRA adapters ({exc})") from None
    load_state(model, state, str(file))


def load_checkpoint_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The weights of checkpoint folder ``ckpt`` into ``model``: its safetensors file or its shards."""
    if (ckpt / WEIGHTS).is_file():
        load_weights(model, ckpt / WEIGHTS)
    else:
        load_shards(model, ckpt / SHARDED)


def unique_names(model: torch.nn.Module) -> set[str]:
    """The name of each weight once: tied weights (the LM head and the embeddings) by their first name."""
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first.setdefault(id(tensor), name)
    return set(first.values())


def load_shards(model: torch.nn.Module, folder: Path) -> None:
    """Load the model weights that ``torch.distributed.checkpoint`` wrote as shards into ``folder``,
    re-split for this number of processes (every process of a group calls it; one alone reads all)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    keep = unique_names(model)
    state = {"model": {k: v for k, v in model.state_dict().items() if k in keep}}
    with shard_io(folder, "load these shards into the model"):
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())


@contextmanager
def shard_io(folder: Path, doing: str):
    """Around a ``torch.distributed.checkpoint`` call on ``folder``: its failure on any process
    becomes one ``CheckpointError`` naming the folder and the first failing process's error (a
    wrong shape, a missing key, a truncated file); its notice that one process works alone is muted."""
    from torch.distributed.checkpoint import CheckpointException  # a BaseException: caught by name

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            yield
        except (Exception, CheckpointException) as exc:
            failures = sorted(getattr(exc, "failures", {}).items())
            inner = failures[0][1][0] if failures else exc
            where = f"process {failures[0][0]}: " if failures else ""
            raise CheckpointError(f"{folder}: cannot {doing} ({where}{type(inner).__name__}"
                                  f"{': ' + first_line(inner) if str(inner).strip() else ''})") from None


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``model``: every weight present, none unknown, every shape right."""
    expected = model.state_dict()
    wanted = _unique_state(expected)
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise CheckpointError(f"{where}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a training output directory's latest complete checkpoint."""
    path = Path(path)
    if is_complete(path):
        return path
    steps = list_checkpoints(path)
    if not steps:
        raise CheckpointError(f"{path}: no complete checkpoint here (expected {WEIGHTS}, {SHARDED}/ "
                              "or checkpoints/step-N/)")
    return steps[-1]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def required_tokens(config: RecipeConfig) -> list[str] | None:
    """Tokens a checkpoint's tokenizer must have: fusionlm's own set, or the image tokens of an LLM's own."""
    tcfg = config.model.tokenizer
    if config.model.llm.hf is None and config.model.llm.arch is None:
        return None
    return [tcfg.image_token] + ([tcfg.newline_token] if needs_newline(config.model) else []) + added_tokens(config.model)


def load_model(path: str | Path, *, device: str = "cpu") -> tuple[FusionLM, object, RecipeConfig]:
    """(model, tokenizer, config) from a checkpoint or a run directory; the model is in eval mode
    on ``device`` (``auto``: a GPU when there is one)."""
    ckpt = resolve_checkpoint(path)
    for name in (CONFIG, TOKENIZER):
        if not (ckpt / name).exists():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {name} is missing")
    config = load_config(ckpt / CONFIG)
    tokenizer = load_tokenizer(ckpt / TOKENIZER, required_tokens(config))
    model = build_model(config, tokenizer, pretrained=False)
    load_checkpoint_weights(model, ckpt)
    lora.merge(model)  # a checkpoint saved mid LoRA stage: its adapters folded into the weights
    model.eval().to(resolve_device(device))
    return model, tokenizer, replace(config, model=model.config)
