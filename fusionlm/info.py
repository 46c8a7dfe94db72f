"""What a recipe costs, before training it: ``fusionlm info RECIPE``.

Parameters per part, image tokens per image (in the encoder and in the decoder sequence), the
decoder length of a typical sample, and FLOPs per sample per part. Forward FLOPs are counted on
a real forward pass over typical samples of the recipe's data (``torch.utils.flop_counter``), one
sample at a time so that no padding is counted; training FLOPs per stage follow from them: a part
that trains costs about 3× its forward (forward, activation gradients, weight gradients), a frozen
part that gradients must pass through 2×, a frozen part with nothing trainable before it 1×; a
``contrastive`` stage runs no decoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import build_model
from .config import RecipeConfig
from .errors import ConfigError
from .data.batching.batches import check_mixture, collate
from .data.chat import SkipSample
from .data.drawing import DrawLayout
from .data.prompt import PromptEncoder
from .data.pixels.processing import ImageSpec
from .data.sources import build_source
from .encoders import ENCODERS
from .hub import arch_of, check_custom_code
from .recipe import make_tokenizer
from .train.report import read_metrics
from .train.stages import select_trainable

PARTS = ("encoder", "connector", "cross_attention", "llm", "image_tokenizer", "generation")  # in the order data flows
PROMPT = "a red circle left of a blue square"  # what a drawing's cost is measured on
SAMPLES_PER_TASK = 4


@dataclass
class Report:
    name: str
    design: str
    params: dict[str, int]
    encoder_tokens: int  # per image (all tiles) at the data's image size
    decoder_tokens: int  # positions one image takes in the decoder sequence
    sample_length: float  # mean decoder length of a typical sample
    images_per_sample: float  # encoder inputs (images, tiles, thumbnails) of a typical sample
    forward: dict[str, float]  # FLOPs per sample per part
    training: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> part -> FLOPs per sample
    drawing: dict[str, float] = field(default_factory=dict)  # a model that draws: codes, FLOPs per picture

    def markdown(self) -> str:
        lines = [f"## {self.name} ({self.design})", "",
                 f"image tokens per image: {self.encoder_tokens} from the encoder, {self.decoder_tokens} "
                 f"positions in the decoder sequence",
                 f"typical sample: {self.sample_length:.0f} decoder tokens, {self.images_per_sample:.2f} encoder inputs "
                 f"(images or tiles)", "",
                 "| part | parameters | forward MFLOPs/sample | " + " | ".join(
                     f"train MFLOPs/sample: {s}" for s in self.training) + " |",
                 "| --- | ---: | ---: | " + " | ".join("---:" for _ in self.training) + " |"]
        for part in (*PARTS, "total"):
            if part != "total" and not self.params.get(part):
                continue
            params = sum(self.params.values()) if part == "total" else self.params[part]
            fwd = sum(self.forward.values()) if part == "total" else self.forward.get(part, 0.0)
            train = [sum(t.values()) if part == "total" else t.get(part, 0.0) for t in self.training.values()]
            lines.append(f"| {part} | {params:,} | {fwd / 1e6:,.2f} | " + " | ".join(f"{x / 1e6:,.2f}" for x in train)
                         + " |")
        if self.drawing:
            d = self.drawing
            lines += ["", f"drawing: {d['codes']:.0f} codes per picture ({d['positions']:.0f} decoder positions with "
                      f"its begin and end and any tokens Emu3 writes around its rows), drawn in {d['passes']:.0f} decoder "
                      f"passes; {d['flops'] / 1e6:,.2f} MFLOPs per picture, "
                      f"{d['flops_guided'] / 1e6:,.2f} with classifier-free guidance (a null row beside each prompt), "
                      f"decoding included"]
        return "\n".join(lines)


def shapes_only(config: RecipeConfig) -> RecipeConfig:
    """A copy of ``config`` with the architecture of its ``hf`` parts recorded from their configs
    alone: nothing is downloaded but the config files, and the weights stay random."""
    config = copy.deepcopy(config)
    llm, enc = config.model.llm, config.model.encoder
    if llm.hf and llm.arch is None:
        raw = check_custom_code(llm.hf, allow=llm.allow_custom_code, key="model.llm.hf")
        from transformers import AutoConfig

        llm.arch = arch_of(AutoConfig.for_model(**raw))
    if enc.hf and enc.arch is None:
        check_custom_code(enc.hf, allow=enc.allow_custom_code, key="model.encoder.hf")
        enc.arch = arch_of(ENCODERS.get(enc.kind).config_cls.from_pretrained(enc.hf))
        if enc.preprocess == "hf" and enc.processor is None:
            from .data.pixels.processing import pretrained_processor

            enc.processor = pretrained_processor(enc.hf)
    return config


def report(config: RecipeConfig, name: str = "recipe") -> Report:
    config = shapes_only(config)
    source = build_source(config.data)
    tokenizer = make_tokenizer(config, source)
    torch.manual_seed(0)
    model = build_model(config, tokenizer, pretrained=False).eval()
    for p in model.parameters():  # counting needs no gradients (and torch's module tracker trips on some)
        p.requires_grad_(False)
    spec = ImageSpec.for_model(model, config, root=source.root)
    params = {part: 0 for part in PARTS}
    for pname, p in model.named_parameters():
        params[model.part_of(pname)] += p.numel()
    batches = typical_batches(model, tokenizer, config, source, spec)
    n = len(batches)
    forward = {part: 0.0 for part in PARTS}
    for batch in batches:  # one sample at a time: no padding is counted
        for part, flops in forward_flops(model, batch).items():
            forward[part] += flops / n
    image = next((img for s in _typical_samples(config, source) for img in s.images), None)
    enc_tokens = dec_tokens = 0
    if image is not None and model.design.reads_codes:  # early fusion: a picture is its codes
        dec_tokens = len(DrawLayout.of(model).tokens())
    elif image is not None:
        inputs = spec.process_all(image)
        enc_tokens = sum(r * c for r, c in (i.grid for i in inputs))
        dec_tokens = len(model.layout.image_tokens(inputs))
    design = config.model.fusion.kind + (f", draws: {config.model.generation.kind}" if model.draws else "")
    out = Report(name=name, design=design, params=params, encoder_tokens=enc_tokens,
                 decoder_tokens=dec_tokens, sample_length=sum(b.num_tokens for b in batches) / n,
                 images_per_sample=sum(b.num_images for b in batches) / n, forward=forward)
    reconstruction = sum(reconstruction_flops(model, b) for b in batches) / n
    for i, stage in enumerate(config.stages):
        chosen = select_trainable(model, stage.train, key=f"stages.{i}.train")
        trains = {model.part_of(p) for p in chosen}
        if stage.objective == "reconstruction":  # the image tokenizer alone, encoder and decoder
            out.training[stage.name] = {part: 3.0 * reconstruction if part == "image_tokenizer" else 0.0
                                        for part in PARTS}
            continue
        runs = PARTS if stage.objective == "lm" else ("encoder", "connector")  # contrastive: no decoder pass
        out.training[stage.name] = {part: forward.get(part, 0.0) * _multiplier(part, trains) if part in runs else 0.0
                                    for part in PARTS}
    if model.draws:
        out.drawing = drawing_cost(model, tokenizer, spec)
    return out


@torch.no_grad()
def reconstruction_flops(model, batch) -> float:
    """FLOPs of the image tokenizer's autoencoding of the pictures ``batch`` draws."""
    if batch.drawn is None:
        return 0.0
    with FlopCounterMode(display=False) as counter:
        model.image_tokenizer(batch.drawn)
    return float(counter.get_total_flops())


def drawing_cost(model, tokenizer, spec) -> dict[str, float]:
    """Codes per picture, and the FLOPs of drawing one (prompt, every code, decoding the codes to
    pixels), without and with guidance."""
    from .draw import DrawRequest, Sampling, draw, passes

    count_cpu_attention()
    layout = DrawLayout.of(model)
    cost = {"codes": float(layout.codes), "positions": float(len(layout.tokens())),
            "passes": float(passes(model, Sampling.of(model.config.generation)))}
    for key, cfg in (("flops", 1.0), ("flops_guided", 3.0)):
        with FlopCounterMode(display=False) as counter:
            draw(model, tokenizer, [DrawRequest(PROMPT)], spec, sampling=Sampling.of(model.config.generation, cfg=cfg),
                 static=False)
        cost[key] = float(counter.get_total_flops())
    return cost


def _multiplier(part: str, trains: set[str]) -> float:
    if part == "image_tokenizer":  # in an lm stage it only turns drawn pictures into target codes
        return 1.0
    if part in trains:
        return 3.0
    upstream = PARTS[: PARTS.index(part)]
    if part == "llm":
        upstream = ("encoder", "connector", "cross_attention")
    return 2.0 if any(u in trains for u in upstream) else 1.0


def _typical_samples(config: RecipeConfig, source):
    stage = config.stages[-1]
    mixture = check_mixture(stage.mixture, source, key=f"stages.{len(config.stages) - 1}.mixture")
    for task, weight in mixture.items():
        if weight > 0:
            for i in range(SAMPLES_PER_TASK):
                yield source.get(task, "train", i)


def typical_batches(model, tokenizer, config: RecipeConfig, source, spec: ImageSpec) -> list:
    """The last stage's mixture, a few samples of each task, encoded as training encodes them,
    each as a batch of one."""
    batches = []
    prompts = PromptEncoder.of(model, tokenizer, spec, max_length=config.model.llm.max_length)
    for sample in _typical_samples(config, source):
        try:
            prompted = prompts.sample(sample, rng=np.random.default_rng(0))  # masked or noised as in training
        except SkipSample:
            continue
        batches.append(collate([prompted], [sample.task], [], tokenizer.pad_token_id))
    if not batches:
        raise ConfigError("no sample of the last stage's mixture fits the context (model.llm.max_length)")
    return batches


def count_cpu_attention() -> None:
    """Teach ``torch.utils.flop_counter`` the CPU kernel of ``scaled_dot_product_attention``
    (idempotent; call before making a ``FlopCounterMode``, which copies the registry). torch
    registers formulas only for the GPU kernels (flash, efficient, cuDNN), so on CPU the attention
    products count 0 FLOPs, and a FLOP model misses the part that grows with the square of the
    sequence. The CPU op takes (query, key, value, ...) and its backward (grad_out, query, key,
    value, ...) as the GPU ones do, so torch's own sdpa formulas apply as they are (they read no
    output shape, and the CPU op returns fewer outputs than the flash one)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = ((aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention),
             (aten._scaled_dot_product_flash_attention_for_cpu_backward,
              aten._scaled_dot_product_flash_attention_backward))
    for cpu_op, gpu_op in pairs:
        if cpu_op not in fc.flop_registry:
            # the registered formula is already shape-wrapped: get_raw keeps it from being wrapped twice
            fc.register_flop_formula(cpu_op, get_raw=True)(fc.flop_registry[gpu_op])


@torch.no_grad()
def forward_flops(model, batch) -> dict[str, float]:
    """FLOPs of one forward pass per part. Cross-attention blocks run inside the LLM's layers, so
    their share is counted apart and taken out of the LLM's. Attention products count on CPU too
    (``count_cpu_attention``)."""
    count_cpu_attention()
    out: dict[str, float] = {}
    context = None
    if batch.pixels is not None:
        with FlopCounterMode(display=False) as counter:
            context = model.encode_images(batch.pixels, batch.input_ids)
        counts = counter.get_flop_counts()  # called outside FusionLM.forward: named by their own class
        for part, module in (("encoder", model.encoder), ("connector", model.connector)):
            out[part] = float(sum(counts.get(type(module).__name__, {}).values()))
        # the rest is the one-off projection of image keys/values for the cross-attention blocks
        out["cross_attention"] = float(sum(counts.get("Global", {}).values())) - out["encoder"] - out["connector"]
    with FlopCounterMode(display=False) as counter:
        model(batch.input_ids, attention_mask=batch.attention_mask, context=context, drawn=batch.drawn,
              noise=batch.noise, times=batch.times)
    decoder = _by_part(counter, model)
    out["generation"] = decoder["generation"]
    if batch.drawn is not None:  # a drawn picture's codes (the model calls the tokenizer's encode, not the module)
        with FlopCounterMode(display=False) as counter:
            model.image_tokenizer.encode(batch.drawn)
        out["image_tokenizer"] = float(counter.get_total_flops())
    if model.native_cross:  # Llama 3.2 Vision: the cross-attention layers are the LLM's own
        counts = counter.get_flop_counts()
        decoder["cross_attention"] = float(sum(sum(counts.get(f"FusionLM.llm.model.layers.{i}", {}).values())
                                               for i in model.llm.config.cross_attention_layers))
    out["cross_attention"] = out.get("cross_attention", 0.0) + decoder.get("cross_attention", 0.0)
    out["llm"] = decoder.get("llm", 0.0) - decoder.get("cross_attention", 0.0)
    return out


def _by_part(counter: FlopCounterMode, model) -> dict[str, float]:
    counts = counter.get_flop_counts()
    total = lambda key: float(sum(counts.get(key, {}).values()))  # noqa: E731
    return {"llm": total("FusionLM.llm"),
            "cross_attention": sum(total(f"FusionLM.cross_blocks.{name}") for name in model.cross_blocks),
            "generation": sum(total(f"FusionLM.{name}") for name, _ in model.named_children()
                              if model.part_of(name) == "generation")}


def training_summary(run) -> list[str]:
    """What each stage of a training run ended at, from its ``metrics.jsonl``: the loss, each kind's
    loss for a model that draws, and for a reconstruction stage the tokenizer's PSNR and codebook use."""
    from pathlib import Path

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return [f"{run}: no metrics.jsonl (not trained yet)"]
    last = {row["stage"]: row for row in read_metrics(path)}  # each stage's last step
    lines = ["", "| stage | steps | loss | text loss | image loss | PSNR (dB) | code perplexity | codes used | dead codes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    cell = lambda row, key, fmt: "—" if row.get(key) is None else format(row[key], fmt)  # noqa: E731
    for stage, row in sorted(last.items()):
        lines.append(f"| {row['stage_name']} | {row['stage_step']} | {cell(row, 'loss', '.4f')} | "
                     f"{cell(row, 'loss_text', '.4f')} | {cell(row, 'loss_image', '.4f')} | {cell(row, 'psnr', '.2f')} | "
                     f"{cell(row, 'perplexity', '.1f')} | {cell(row, 'used', '.1%')} | {cell(row, 'dead', 'd')} |")
    return lines + ["", "(each stage's last step: one batch, as metrics.jsonl logged it)"]
