"""What every checkpoint format shares: the registry, weight renaming, and the import/export flows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from ..checkpoint import added_tokens, build_model, load_model, load_state, needs_newline, save_model
from ..config import ModelConfig, RecipeConfig
from ..data.pixels.processing import pretrained_processor
from ..data.tokenizer import add_tokens, load_any_tokenizer, prepare_tokenizer
from ..errors import CheckpointError, ConfigError, ExportError
from ..hub import check_custom_code, torch_dtype
from ..model import FusionLM
from ..registry import Registry


class Format:
    """One transformers model class, both ways.

    ``renames`` pairs a prefix of fusionlm's weight names with the format's, first match wins.
    """

    name: str
    model_type: str
    renames: list[tuple[str, str]]

    def hf_class(self) -> type[PreTrainedModel]:
        raise NotImplementedError

    # --- import
    def recipe(self, hf_config: PretrainedConfig, processor: dict[str, Any] | None, tokenizer) -> ModelConfig:
        """The model section of a recipe that rebuilds this checkpoint."""
        raise NotImplementedError

    def adapt_tokenizer(self, tokenizer, model: ModelConfig):
        """The checkpoint's own tokenizer, made to encode prompts the way this format's processor
        does (a chat template…), before fusionlm adds what it lacks. Default: as it is."""
        return tokenizer

    # --- export
    def check(self, model: FusionLM) -> None:
        """Raise ``ExportError`` saying what of ``model`` does not fit this format."""
        raise NotImplementedError

    def hf_config(self, model: FusionLM) -> PretrainedConfig:
        raise NotImplementedError

    def processor(self, model: FusionLM, tokenizer):
        """The transformers processor to save next to the exported weights."""
        raise NotImplementedError

    def generation_settings(self, model: FusionLM, tokenizer) -> dict[str, Any]:
        """What this format's ``generate`` reads from the saved generation config, beyond the end
        and padding tokens."""
        return {}

    # --- weights
    def to_ours(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {rename(k, [(theirs, ours) for ours, theirs in self.renames]): v for k, v in state.items()}

    def to_theirs(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {rename(k, self.renames): v for k, v in state.items()}


def rename(name: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class FormatRegistry(Registry[Format]):
    def for_model_type(self, model_type: str, source: str) -> Format:
        for name in self.names():
            fmt = self.get(name)
            if fmt.model_type == model_type:
                return fmt
        known = ", ".join(f"{self.get(n).model_type} ({n})" for n in self.names())
        raise ConfigError(f"{source}: cannot import a {model_type!r} checkpoint (known model types: {known})")


FORMATS = FormatRegistry("format", "--format")
WHOLE = "fusionlm"  # export's own format: a whole fusionlm checkpoint


def register(fmt: Format) -> Format:
    FORMATS.register(fmt.name)(fmt)
    return fmt


# ----------------------------------------------------------------------------- import


def import_checkpoint(source: str, out: str | Path, *, dtype: str = "float32", allow_custom_code: bool = False,
                      log=print) -> Path:
    """Convert a transformers checkpoint (a directory or a hub id) into a fusionlm checkpoint at ``out``."""
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        what = " (it is a fusionlm checkpoint already)" if (Path(source) / "config.yaml").is_file() else ""
        raise ConfigError(f"{source}: no transformers config.json here{what}")
    check_custom_code(source, allow=allow_custom_code, key="import")
    raw, _ = PretrainedConfig.get_config_dict(source)
    fmt = FORMATS.for_model_type(raw.get("model_type", "?"), source)
    log(f"{source}: a {fmt.name} checkpoint; loading it with transformers' {fmt.hf_class().__name__}")
    hf = fmt.hf_class().from_pretrained(source, dtype=torch_dtype(dtype), trust_remote_code=allow_custom_code)
    tokenizer = load_any_tokenizer(source, allow_custom_code=allow_custom_code)
    config = RecipeConfig(model=fmt.recipe(hf.config, _image_processor(source), tokenizer))
    config.model.encoder.dtype = config.model.llm.dtype = dtype
    tcfg = config.model.tokenizer
    tokenizer = prepare_tokenizer(fmt.adapt_tokenizer(tokenizer, config.model), image_token=tcfg.image_token,
                                  newline_token=tcfg.newline_token, need_newline=needs_newline(config.model))
    tokenizer = add_tokens(tokenizer, added_tokens(config.model))
    model = build_model(config, tokenizer, pretrained=False)  # grown by any tokens added above
    load_state(model, with_added_rows(fmt.to_ours(hf.state_dict()), model), source)
    path = save_model(model.eval(), tokenizer, config, out)
    log(f"wrote {path}")
    return path


def vocab_names(model: FusionLM) -> set[str]:
    """The state-dict names of the LLM's input and output embeddings (one row per token)."""
    llm = model.llm
    tables = {id(m.weight) for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in tables}


def with_added_rows(state: dict[str, torch.Tensor], model: FusionLM) -> dict[str, torch.Tensor]:
    """``state`` with its embedding tables extended to ``model``'s vocabulary: the checkpoint's rows
    first, exactly, then ``model``'s own freshly initialised rows for the tokens added at import
    (a chat template's role tokens, an image token…). Every other weight is left as it is."""
    expected = model.state_dict()
    out = dict(state)
    for name in vocab_names(model):
        theirs, ours = state.get(name), expected[name]
        if theirs is None or theirs.shape[1:] != ours.shape[1:] or theirs.shape[0] >= ours.shape[0]:
            continue  # absent or not a smaller table of the same width: load_state says what is wrong
        out[name] = torch.cat([theirs.to(ours.dtype), ours[theirs.shape[0]:]])
    return out


def _image_processor(source: str) -> dict[str, Any] | None:
    try:
        return pretrained_processor(source)
    except ConfigError:
        return None  # no image processor saved: images are letterboxed


# ----------------------------------------------------------------------------- export


def export_checkpoint(checkpoint: str | Path, out: str | Path, format_name: str, *, log=print) -> Path:
    """Write ``checkpoint`` as a directory transformers' class for ``format_name`` loads, or
    (``fusionlm``) as one whole fusionlm checkpoint: one safetensors file, e.g. from a run's shards."""
    if format_name == WHOLE:
        model, tokenizer, config = load_model(checkpoint)
        return save_model(model, tokenizer, config, out)
    fmt = FORMATS.get(format_name)
    model, tokenizer, _ = load_model(checkpoint)
    fmt.check(model)
    hf = fmt.hf_class()(fmt.hf_config(model))
    state = fmt.to_theirs(model.state_dict())
    expected = hf.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"{missing[0]!r} has no counterpart" if missing else f"{extra[0]!r} has no place in {format_name}"
        raise ExportError(f"{checkpoint}: {what} ({len(missing)} missing, {len(extra)} left over)")
    try:
        load_state(hf, state, f"{format_name} export")
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    hf.tie_weights()
    ids = model.ids
    hf.generation_config = GenerationConfig(eos_token_id=ids.end, pad_token_id=ids.pad,
                                            **fmt.generation_settings(model, tokenizer))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(str(tmp))
    fmt.processor(model, tokenizer).save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"wrote {out} ({format_name}: load it with transformers' {fmt.hf_class().__name__}.from_pretrained)")
    return out
