"""One typed, nested config: the single source of truth for a model and its training run.

A recipe YAML has four top-level sections — ``model``, ``data``, ``train``, ``stages`` — that map
onto the dataclasses below. Loading is strict: an unknown key, a missing required key or a value
of the wrong type is a ``ConfigError`` that names the dotted key and what is allowed. The config
is saved next to the weights, and a model is rebuilt from it alone.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .designs import design_of
from .errors import ConfigError


@dataclass
class EncoderConfig:
    """Image encoder. ``kind`` names an entry of ``encoders.ENCODERS``."""

    kind: str = "siglip"
    hf: str | None = None  # pretrained tower: a local directory or a hub id
    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    feature_layer: int = -1  # index into the tower's hidden states; LLaVA takes -2
    drop_cls: bool = True  # drop the CLS token (towers that have one, e.g. CLIP)
    dtype: str = "float32"  # dtype the tower's weights are loaded and kept in
    allow_custom_code: bool = False  # let a checkpoint's own Python code (auto_map) run
    preprocess: str = "letterbox"  # letterbox (square, padded) | hf (the checkpoint's image processor)
    processor: dict[str, Any] | None = None  # the image processor's settings (recorded from `hf` or import)
    arch: dict[str, Any] | None = None  # the tower's full transformers config (recorded; rebuilds it offline)
    # CLIP / SigLIP used above the size they were built for (MM1: 378 -> 672): images are
    # letterboxed at this side and the tower interpolates its position embeddings; None: its own size.
    resolution: int | None = None


@dataclass
class ConnectorConfig:
    """Encoder features -> LLM width. ``kind`` names an entry of ``connectors.CONNECTORS``."""

    kind: str = "mlp"
    hidden_size: int | None = None  # the connector's own width (MLP, C-Abstractor, Perceiver, Q-Former); default: the LLM's
    act: str = "gelu"  # MLP activation, a transformers ACT2FN name
    bias: bool = True
    num_tokens: int = 64  # avgpool / cabstractor / perceiver / qformer: image tokens out (about, for pooling)
    depth: int = 2  # perceiver / qformer layers; cabstractor: residual blocks per stage
    num_heads: int = 4  # perceiver / qformer attention heads


@dataclass
class LLMConfig:
    """The decoder. ``kind`` names an entry of ``llm.LLMS``; sizes apply to a random init."""

    kind: str = "llama"
    hf: str | None = None  # pretrained LLM: a local directory or a hub id
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_length: int = 256  # context length: longer samples are dropped, never cut mid-image
    vocab_size: int | None = None  # filled in from the tokenizer when the model is built
    tie_embeddings: bool = True
    init_std: float = 0.02  # std of the random init (transformers' initializer_range)
    dtype: str = "float32"  # dtype the weights are loaded and kept in
    allow_custom_code: bool = False  # let a checkpoint's own Python code (auto_map) run
    arch: dict[str, Any] | None = None  # the LLM's full transformers config (recorded; rebuilds it offline)


@dataclass
class FusionConfig:
    """How image features reach the decoder. ``kind``: a design of ``fusionlm.designs`` (unified, fuyu,
    cross_attention, hybrid)."""

    kind: str = "unified"
    every_n: int = 2  # cross_attention: a gated block before every Nth decoder layer
    first_layer: int = 0  # cross_attention: index of the first layer that gets a block
    # cross_attention: which images a text token sees. ``preceding``: every image before it;
    # ``latest``: only the most recent one (a run of adjacent images counts as one), as in
    # Flamingo and Llama 3.2 Vision.
    visibility: str = "preceding"


@dataclass
class TokenizerConfig:
    """Tokenizer: trained on the synthetic world's corpus unless ``path`` names a saved one."""

    path: str | None = None  # a saved tokenizer; default: the LLM's own (``llm.hf``) or a new one
    vocab_size: int = 800  # a newly trained tokenizer's size
    corpus_per_task: int = 300
    image_token: str = "<image>"  # the token an image's positions hold (added if the tokenizer lacks it)
    newline_token: str = "<image_newline>"  # fuyu: ends each row of patches
    end_token: str | None = None  # end of a turn; default: read off the chat template


@dataclass
class TilingConfig:
    """Dynamic high resolution (LLaVA-NeXT's AnyRes, NVLM's dynamic tiles): an image is cut into a
    grid of encoder-sized tiles chosen from its aspect ratio, plus a downscaled thumbnail."""

    max_tiles: int = 0  # 0: no tiling, the image is letterboxed whole
    min_tiles: int = 1
    thumbnail: bool = True  # add the whole image, downscaled, after its tiles
    # How the LLM tells tiles apart: ``tags`` (NVLM: text ``<tile_k>`` / ``<tile_global_thumbnail>``
    # before each tile's tokens), ``newline`` (an image-newline token after each tile), ``none``.
    marker: str = "tags"


@dataclass
class VideoConfig:
    """Video input (``<video>`` items, see ``data.video``): every clip is sampled to ``frames`` frames,
    each encoded as an image; the connector outputs of each ``temporal_pool`` consecutive frames are
    averaged into one image's worth of tokens, so a clip takes ``frames / temporal_pool`` image slots."""

    frames: int = 8
    temporal_pool: int = 1


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    video: VideoConfig = field(default_factory=VideoConfig)


SOURCE_FORMATS = ("auto", "synthetic", "llava", "qa", "webdataset", "parquet", "jsonl", "hf")


@dataclass
class SourceConfig:
    """One named source of ``data.sources`` (see ``fusionlm.data.sources.mix``)."""

    path: str = ""  # a file or a folder of shards/files (not needed for ``synthetic``)
    format: str = "auto"  # one of SOURCE_FORMATS; auto: from the path
    image_root: str | None = None  # llava/qa: the folder image paths are relative to
    task: str | None = None  # streamed formats: the task name of their samples (default: by format)


@dataclass
class DataConfig:
    """Where samples come from. ``source``: ``synthetic`` or the path of a LLaVA-style JSON."""

    source: str = "synthetic"
    image_root: str | None = None  # LLaVA JSON: the folder image paths are relative to
    world_image_size: int = 64  # synthetic world: the side of a rendered scene, in pixels
    world_seed: int = 0
    max_image_pixels: int = 40_000_000  # refused from the header above this
    # an animated GIF/WebP/PNG clip's frames x width x height (all are decoded), refused from the
    # header above this; null: no cap
    max_video_pixels: int | None = 400_000_000
    max_bad_fraction: float = 0.1  # training stops when more samples than this are bad
    loader_workers: int = 0  # background processes that prepare batches
    pack: bool = False  # several short samples per row up to model.llm.max_length (unified and fuyu)
    # named sources a stage mixture draws from by name, e.g. {captions: {path: shards/, format: webdataset}}
    # with ``mixture: {captions: 45, docs: 45, text: 10}``; when set, ``source`` stays "synthetic"
    sources: dict[str, SourceConfig] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Run-wide settings."""

    seed: int = 0
    init_from: str | None = None  # start from this fusionlm checkpoint's model, tokenizer and weights
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end of each stage
    keep_checkpoints: int = 2
    # full: whole tensors in one safetensors file, gathered and written by rank 0; sharded: each
    # process writes its own shards (torch.distributed.checkpoint), nothing gathered (large fsdp runs)
    checkpoint_format: str = "full"
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N | mps
    bf16: bool = False  # bf16 autocast for the forward pass
    # torch.compile each LLM decoder layer (fused elementwise work; the first steps of each new
    # sequence length compile, so it pays on long runs)
    compile: bool = False
    grad_clip: float | None = 1.0  # the gradients' global L2 norm is clipped to this; 0 or null: no clipping
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    eval_per_task: int = 50  # samples per task for `fusionlm eval` and the demo
    eval_batch_size: int = 32
    # several processes (torchrun): ddp = every process holds the whole model, gradients summed by
    # PyTorch's DDP during backward; fsdp = weights, gradients and optimizer state sharded across
    # processes (FSDP2, fully_shard: each decoder layer, then the rest)
    parallel: str = "ddp"
    backend: str = "auto"  # auto: NCCL for CUDA tensors (CPU ones over gloo) on GPUs, else gloo | gloo | nccl
    timeout_s: int = 1800  # a collective that waits longer than this stops the run (a process died or hangs)
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (less memory, ~1/3 more compute)
    report_to: list[str] = field(default_factory=list)  # also log metrics to: tensorboard, wandb
    run_name: str | None = None  # the W&B run's name; None = the run directory's name


@dataclass
class LoraConfig:
    """A stage's LoRA adapters (peft): injected into ``parts`` before the stage, the only weights of
    those parts that train, merged into them at the stage's end (see ``fusionlm.lora``)."""

    parts: list[str] = field(default_factory=lambda: ["llm"])  # llm and/or encoder (its tower)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None  # module names (q_proj, v_proj, ...); None: every linear layer but the head


@dataclass
class StageConfig:
    """One training stage: what trains, on which mixture, for how long."""

    name: str = "stage"
    # This stage only makes a part that a real run downloads (``llm`` or ``encoder``): it is
    # skipped when that part is pretrained (its ``hf`` is set, or the run starts from ``init_from``).
    stand_in_for: str | None = None
    objective: str = "lm"  # lm (next-token loss on targets) | contrastive (image-text alignment)
    train: list[str] = field(default_factory=lambda: ["connector"])
    mixture: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    steps: int = 100
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)  # per part, e.g. {encoder: 0.1}
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    # LoRA on the LLM and/or the encoder tower; ``train`` then names what else trains fully (may be []).
    lora: LoraConfig | None = None


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])


# ----------------------------------------------------------------------------- dict <-> dataclass


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-2 (no dot) as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in hints]
    if unknown:
        where = f"{prefix}: " if prefix else ""
        raise ConfigError(f"{where}unknown key {unknown[0]!r} (allowed: {', '.join(names)})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict, cls: type = RecipeConfig) -> Any:
    """Build ``cls`` from a plain dict; missing keys take their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}")
    return _from_dict(cls, data, "")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------- overrides and files


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (``stages.0.steps=20``) to a recipe dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _step_into(node, part, ".".join(parts[: depth + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, dotted)] = _parse_value(raw)
        elif isinstance(node, dict):
            node[last] = _parse_value(raw)
        else:
            raise ConfigError(f"{'.'.join(parts[:-1])}: cannot set a key inside a {type(node).__name__}")
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: {part!r} is not an index of a list of length {len(node)}")
    return int(part)


def _step_into(node: Any, part: str, key: str, *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: cannot set a key inside a {type(node).__name__}")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"{key}: no such key")
        node[part] = {}
    return node[part]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (a path, or the name of a shipped recipe), apply overrides, validate."""
    path = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with model/data/train/stages")
    apply_overrides(data, overrides or [])
    try:
        return validate(from_dict(data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


RECIPES_DIR = Path(__file__).parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = RECIPES_DIR / f"{path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"{path}: no such recipe file (shipped recipes: {', '.join(shipped_recipes())})")


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_config(path: str | Path) -> RecipeConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        return validate(from_dict(data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------- semantic checks

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = {  # dotted key -> allowed values, checked by ``validate``
    "model.encoder.dtype": DTYPES,
    "model.llm.dtype": DTYPES,
    "model.encoder.preprocess": ("letterbox", "hf"),
    "model.fusion.visibility": ("preceding", "latest"),
    "model.tiling.marker": ("tags", "newline", "none"),
    "train.parallel": ("ddp", "fsdp"),
    "train.checkpoint_format": ("full", "sharded"),
    "train.backend": ("auto", "gloo", "nccl"),
}
TRAINABLE_GROUPS = ("encoder", "connector", "llm", "cross_attention", "all")
REPORT_TO = ("tensorboard", "wandb")  # train.report_to: where metrics go besides metrics.jsonl


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
    design.check(config)
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
        if not stage.mixture or any(w < 0 for w in stage.mixture.values()) or sum(stage.mixture.values()) <= 0:
            raise ConfigError(f"stages.{i}.mixture: needs at least one positive weight")
        bad = [p for p in stage.lr_scale if p not in TRAINABLE_GROUPS[:-1]]
        if bad:
            raise ConfigError(f"stages.{i}.lr_scale: unknown part {bad[0]!r} (parts: {', '.join(TRAINABLE_GROUPS[:-1])})")
        if stage.objective not in ("lm", "contrastive"):
            raise ConfigError(f"stages.{i}.objective: unknown objective {stage.objective!r} (known: lm, contrastive)")
        if stage.stand_in_for not in (None, "llm", "encoder"):
            raise ConfigError(f"stages.{i}.stand_in_for: {stage.stand_in_for!r} is not one of llm, encoder")
        if not stage.train and stage.lora is None:
            raise ConfigError(f"stages.{i}.train: name at least one part ({', '.join(TRAINABLE_GROUPS)}) or a glob")
        if stage.lora is not None:
            _validate_lora(stage, f"stages.{i}.lora")
    return config


LORA_PARTS = ("llm", "encoder")


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
