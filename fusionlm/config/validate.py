"""The checks a recipe needs beyond its types; component names are checked by their registries,
and each fusion design checks its own settings (``designs.Design.check``)."""

from __future__ import annotations

from ..designs import design_of
from ..generators import generator_of
from ..errors import ConfigError
from .schema import (
    CHOICES, LORA_PARTS, LOSS_KINDS, OBJECTIVE_NAMES, PARTS, REPORT_TO, SOURCE_FORMATS, STAND_INS, TRAINABLE_GROUPS, DataConfig,
    RecipeConfig, StageConfig,
)


def validate(config: RecipeConfig) -> RecipeConfig:
    """Checks that need more than types. Component names are checked by their registries."""
    fusion = config.model.fusion
    design = design_of(fusion.kind)  # a ConfigError listing the designs, for an unknown one
    for dotted, allowed in CHOICES.items():
        value = config
        for part in dotted.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    tiling = config.model.tiling
    if tiling.max_tiles < 0 or not 1 <= tiling.min_tiles:
        raise ConfigError("model.tiling: max_tiles must be >= 0 and min_tiles >= 1")
    if tiling.max_tiles and tiling.min_tiles > tiling.max_tiles:
        raise ConfigError(f"model.tiling.min_tiles: {tiling.min_tiles} is more than max_tiles {tiling.max_tiles}")
    if tiling.thumbnail_from not in (1, 2):
        raise ConfigError(f"model.tiling.thumbnail_from: {tiling.thumbnail_from}; 1 (a thumbnail after every "
                          f"image) or 2 (none after an image that fits one tile)")
    design.check(config)
    generator_of(config.model.generation.kind).check(config)  # a ConfigError listing the designs, for an unknown one
    if tiling.max_tiles and config.model.encoder.kind in ("patches", "mllama", "qwen2vl"):
        raise ConfigError(f"model.tiling: the {config.model.encoder.kind!r} encoder cuts images its own way; "
                          f"leave max_tiles at 0")
    video = config.model.video
    if video.frames < 1 or video.temporal_pool < 1:
        raise ConfigError(f"model.video: frames ({video.frames}) and temporal_pool ({video.temporal_pool}) must be >= 1")
    if video.frames % video.temporal_pool:
        raise ConfigError(f"model.video.temporal_pool: {video.temporal_pool} does not divide model.video.frames "
                          f"{video.frames} (each pooled group is {video.temporal_pool} consecutive frames)")
    if fusion.every_n < 1:
        raise ConfigError("model.fusion.every_n: must be >= 1")
    enc = config.model.encoder
    if enc.image_size % enc.patch_size:
        raise ConfigError(
            f"model.encoder.image_size: {enc.image_size} is not a multiple of patch_size {enc.patch_size}"
        )
    _validate_sources(config.data)
    unknown = [name for name in config.train.report_to if name not in REPORT_TO]
    if unknown:
        raise ConfigError(f"train.report_to: {unknown[0]!r} is not one of {', '.join(REPORT_TO)}")
    if config.train.grad_clip is not None and config.train.grad_clip < 0:
        raise ConfigError(f"train.grad_clip: {config.train.grad_clip} is negative (a maximum gradient norm; "
                          "0 or null turns clipping off)")
    if config.train.timeout_s <= 0:
        raise ConfigError(f"train.timeout_s: {config.train.timeout_s} must be a positive number of seconds")
    if not config.stages:
        raise ConfigError("stages: at least one stage is needed")
    for i, stage in enumerate(config.stages):
        if stage.steps < 0 or stage.batch_size < 1 or stage.grad_accum < 1:
            raise ConfigError(f"stages.{i}: steps must be >= 0, batch_size and grad_accum >= 1")
        if stage.threads < 0:
            raise ConfigError(f"stages.{i}.threads: {stage.threads} is negative (0: train.threads)")
        if not stage.mixture or any(w < 0 for w in stage.mixture.values()) or sum(stage.mixture.values()) <= 0:
            raise ConfigError(f"stages.{i}.mixture: needs at least one positive weight")
        bad = [p for p in stage.lr_scale if p not in PARTS]
        if bad:
            raise ConfigError(f"stages.{i}.lr_scale: unknown part {bad[0]!r} (parts: {', '.join(PARTS)})")
        if stage.objective not in OBJECTIVE_NAMES:
            raise ConfigError(f"stages.{i}.objective: unknown objective {stage.objective!r} "
                              f"(known: {', '.join(OBJECTIVE_NAMES)})")
        if stage.stand_in_for is not None and stage.stand_in_for not in STAND_INS:
            raise ConfigError(f"stages.{i}.stand_in_for: {stage.stand_in_for!r} is not one of {', '.join(STAND_INS)}")
        if not stage.train and stage.lora is None:
            raise ConfigError(f"stages.{i}.train: name at least one part ({', '.join(TRAINABLE_GROUPS)}) or a glob")
        if stage.lora is not None:
            _validate_lora(stage, f"stages.{i}.lora")
        if not 0 <= stage.condition_dropout < 1:
            raise ConfigError(f"stages.{i}.condition_dropout: {stage.condition_dropout} is not in [0, 1)")
        bad = [k for k, w in stage.loss_weights.items() if k not in LOSS_KINDS or w < 0]
        if bad:
            raise ConfigError(f"stages.{i}.loss_weights: {bad[0]!r} is not one of {', '.join(LOSS_KINDS)} with a "
                              f"weight >= 0")
    return config


def _validate_lora(stage: StageConfig, key: str) -> None:
    lora = stage.lora
    if not lora.parts or any(p not in LORA_PARTS for p in lora.parts):
        bad = next((p for p in lora.parts if p not in LORA_PARTS), None)
        raise ConfigError(f"{key}.parts: {bad!r} is not one of {', '.join(LORA_PARTS)}" if bad
                          else f"{key}.parts: name at least one of {', '.join(LORA_PARTS)}")
    if len(set(lora.parts)) != len(lora.parts):
        raise ConfigError(f"{key}.parts: {lora.parts} names a part twice")
    if lora.r < 1:
        raise ConfigError(f"{key}.r: the rank must be >= 1 (got {lora.r})")
    if lora.alpha <= 0:
        raise ConfigError(f"{key}.alpha: must be > 0 (got {lora.alpha})")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"{key}.dropout: must be in [0, 1) (got {lora.dropout})")
    if lora.targets is not None and (not lora.targets or not all(t.strip() for t in lora.targets)):
        raise ConfigError(f"{key}.targets: name at least one module (q_proj, v_proj, ...) or leave it null")
    full = [p for p in lora.parts if p in stage.train or "all" in stage.train]
    if full:
        raise ConfigError(f"{key}.parts: the {full[0]} is also in train, which trains all its weights; "
                          f"LoRA trains only adapters (leave {full[0]!r} out of train)")


def _validate_sources(data: DataConfig) -> None:
    if data.max_video_pixels is not None and data.max_video_pixels < 1:
        raise ConfigError(f"data.max_video_pixels: {data.max_video_pixels} must be a positive number of pixels "
                          f"(a clip's frames x width x height) or null for no cap")
    if data.sources and data.source != "synthetic":
        raise ConfigError("data.sources: set either data.source or data.sources, not both")
    for name, spec in data.sources.items():
        if not name or "/" in name or name == "*":
            raise ConfigError(f"data.sources: {name!r} is not a source name (no '/', not '*')")
        if spec.format not in SOURCE_FORMATS:
            raise ConfigError(f"data.sources.{name}.format: {spec.format!r} is not one of {', '.join(SOURCE_FORMATS)}")
        if spec.format != "synthetic" and not spec.path:
            raise ConfigError(f"data.sources.{name}.path: missing (a file or a folder)")
