"""The recipe's schema: one dataclass per section, and the values some keys allow.

A recipe YAML has four top-level sections — ``model``, ``data``, ``train``, ``stages`` — that map
onto the dataclasses below; ``RecipeConfig`` holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # How pixels become patch tokens: "patch" (the tower's own linear patch embedding, one
    # patch_size x patch_size convolution) or "conv" (a stack of stride-2 3x3 convolutions down to
    # the same grid, Xiao et al. 2021's early convolutions: the translation equivariance that lets a
    # small tower trained from scratch read glyphs at any offset; towers built from sizes only).
    stem: str = "patch"


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
class ImageTokenizerConfig:
    """The visual vocabulary: an image <-> a grid of discrete codes (what a model that draws writes).
    ``kind`` names an entry of ``image_tokenizers.IMAGE_TOKENIZERS``; not the text ``TokenizerConfig``.
    A pretrained kind (janus, emu3) settles ``image_size``'s grid, ``downsample`` and ``codebook_size``
    from its checkpoint and records them in the tokenizer's own config."""

    kind: str = "vq"
    image_size: int = 32
    downsample: int = 4  # pixels per code along each side: a 32-pixel image is an 8x8 grid of codes
    codebook_size: int = 512
    code_dim: int = 32  # the width of a code vector (janus / emu3: settled from the VQ model)
    channels: int = 64  # vq: the convolutional encoder's and decoder's width
    decay: float = 0.9  # vq: EMA decay of the codebook
    kmeans_init: bool = True  # vq: the codebook starts as k-means centres of the first batch
    dead_code_threshold: float = 1.0  # vq: a code whose EMA count falls below this is re-seeded from the batch
    commitment: float = 0.25  # vq: weight of the commitment loss
    # multiscale (VAR): the side of each scale's code map, coarse to fine, the last image_size / downsample;
    # empty: 1, 2, 4, ... up to it
    scales: list[int] = field(default_factory=list)
    hf: str | None = None  # janus / emu3: a pretrained VQ model, a local directory or a hub id
    allow_custom_code: bool = False  # let a checkpoint's own Python code (auto_map) run
    arch: dict[str, Any] | None = None  # janus / emu3: the VQ model's transformers config (recorded; rebuilds it offline)


@dataclass
class GenerationConfig:
    """How the LLM draws. ``kind`` names a design of ``fusionlm.generators`` (``none``: it only reads;
    ``shared``: Chameleon / Emu3 / Anole, the tokenizer's codes appended to the LLM's vocabulary
    under one LM head; ``masked``: Show-o, the same with a ``[MASK]`` code, images learnt and drawn by
    masked parallel prediction; ``decoupled``: Janus, the codes through an embedding + aligner of their own in
    and a generation head out). Drawing needs ``model.image_tokenizer``."""

    kind: str = "none"
    begin_token: str = "<begin_of_image>"  # opens a drawn image (added to the tokenizer)
    end_token: str = "<end_of_image>"  # closes it
    code_token: str = "<image_code>"  # a drawn image's positions before its codes are known (added too)
    row_end_token: str | None = None  # Emu3: this token ends each row of codes (added too); None: no row ends
    # Emu3 writes more around the codes: <|image start|> 4*4 <|image token|> codes <|extra_201|> <|image end|>
    size_header: bool = False  # the grid written as text, "{rows}*{cols}", after the begin token
    header_token: str | None = None  # a token before the first code (after the size; added too)
    frame_end_token: str | None = None  # a token after the last row, before the end token (added too)
    head_hidden: int | None = None  # decoupled: the aligner's and the generation head's width; default: the LLM's
    # how the model draws unless told otherwise (``fusionlm generate --image-out``, GenEval in ``eval``)
    cfg: float = 3.0  # classifier-free guidance scale (1: none)
    temperature: float = 1.0
    top_k: int = 0  # 0: every code
    # masked: the parallel passes that unmask an image (cosine schedule of the codes left masked);
    # diffusion: the Euler steps of the flow that denoise it
    steps: int = 8
    # the null prompt that condition dropout trains on and guidance samples against:
    # ``text_removed``: the prompt's turns without their text (the pictures they show stay);
    # ``padded`` (Janus): the prompt's tokens before the picture, each but BOS and <begin_of_image>
    # replaced by the padding token, still attended (pictures it shows are padded away too)
    null_prompt: str = "text_removed"
    code_offset: int | None = None  # recorded: the id of code 0 (the text vocabulary's size when first built)


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
    # tokens around each image a prompt shows (Janus: <begin_of_image> ... <end_of_image>), added if
    # missing; None: the image's positions stand alone
    image_begin: str | None = None
    image_end: str | None = None
    end_token: str | None = None  # end of a turn; default: read off the chat template


@dataclass
class TilingConfig:
    """Dynamic high resolution (LLaVA-NeXT's AnyRes, NVLM's dynamic tiles): an image is cut into a
    grid of encoder-sized tiles chosen from its aspect ratio, plus a downscaled thumbnail."""

    max_tiles: int = 0  # 0: no tiling, the image is letterboxed whole
    min_tiles: int = 1
    thumbnail: bool = True  # add the whole image, downscaled, after its tiles
    # the thumbnail follows images cut into at least this many tiles; an image that fits one tile is
    # then shown once, untiled (2: InternVL's rule, its tiler adds no thumbnail to a lone tile); 1: every image
    thumbnail_from: int = 1
    # How the LLM tells tiles apart: ``tags`` (NVLM: text ``<tile_k>`` / ``<tile_global_thumbnail>``
    # before each tile's tokens), ``newline`` (an image-newline token after each tile), ``none``.
    marker: str = "tags"


@dataclass
class VideoConfig:
    """Video input (``<video>`` items, see ``data.pixels.video``): every clip is sampled to ``frames`` frames,
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
    image_tokenizer: ImageTokenizerConfig | None = None  # the visual vocabulary (a model that draws)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


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
    # several samples per row (fusionlm.data.batching.packing), each seeing only its own text and
    # images; null: wherever that is exact (the lm stages of a model that does not draw); false: one sample per row
    pack: bool | None = None
    # one sample per row and grad_accum > 1: a process's samples of a step, sorted by length, fill its
    # micro-batches in turn (less padding, the same step); lm stages only (a contrastive batch's
    # negatives are its own samples)
    group_by_length: bool = True
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
    # torch.compile each LLM decoder layer (fused elementwise work; the first steps compile, so it
    # pays on long runs); null: a stage compiles them when it is long enough to pay it back
    # (fusionlm.train.compiled)
    compile: bool | None = None
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
    # torch intra-op threads in this stage; 0: train.threads. A stage whose step is mostly making
    # its batch (a contrastive stage of small images) runs faster with one, leaving a core to the
    # data loader; a stage that runs the LLM wants them all.
    threads: int = 0
    # LoRA on the LLM and/or the encoder tower; ``train`` then names what else trains fully (may be []).
    lora: LoraConfig | None = None
    # text-to-image samples: the share whose prompt is replaced by the null prompt that guidance
    # samples against (``data.drawing.null_prompt``), drawn per sample number (resumes exactly)
    condition_dropout: float = 0.0
    # lm objective: the weight of each kind of target in the loss (text tokens, image codes)
    loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])


# ----------------------------------------------------------------------------- allowed values

DTYPES = ("float32", "bfloat16", "float16")
NULL_PROMPTS = ("text_removed", "padded")  # model.generation.null_prompt
CHOICES = {  # dotted key -> allowed values, checked by ``validate``
    "model.encoder.dtype": DTYPES,
    "model.llm.dtype": DTYPES,
    "model.encoder.preprocess": ("letterbox", "hf"),
    "model.fusion.visibility": ("preceding", "latest"),
    "model.tiling.marker": ("tags", "newline", "none"),
    "train.parallel": ("ddp", "fsdp"),
    "train.checkpoint_format": ("full", "sharded"),
    "train.backend": ("auto", "gloo", "nccl"),
    "model.generation.null_prompt": NULL_PROMPTS,
}
PARTS = ("encoder", "connector", "llm", "cross_attention", "image_tokenizer", "generation")  # the groups of weights a stage trains
TRAINABLE_GROUPS = PARTS + ("all",)  # stages.N.train: parts, "all", or globs over parameter names
REPORT_TO = ("tensorboard", "wandb")  # train.report_to: where metrics go besides metrics.jsonl
LORA_PARTS = ("llm", "encoder")  # stages.N.lora.parts: the transformers models LoRA adapts
OBJECTIVE_NAMES = ("lm", "contrastive", "reconstruction")  # stages.N.objective (each a class in ``train.objectives``)
STAND_INS = ("llm", "encoder", "image_tokenizer")
LOSS_KINDS = ("text", "image")  # stages.N.loss_weights: the kinds of target the lm objective weighs  # stages.N.stand_in_for: the pre-training a stand-in stage replaces
