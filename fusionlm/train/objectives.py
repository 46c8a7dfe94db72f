"""What a stage optimises. ``lm``: next-token loss on target tokens. ``contrastive``: CLIP-style
alignment of images with their texts, a cheap encoder pre-training stage (seed 003's lever).
``reconstruction``: the image tokenizer's autoencoding of the pictures a model draws.

Each objective is a class behind ``OBJECTIVES``. It counts the *items* a micro-batch holds (target
tokens; samples) and returns the *sum* of their losses: the loop divides by the count of the whole
step, over every micro-batch and process, so that accumulation and data parallelism change nothing
(as transformers does with ``num_items_in_batch``).

The contrastive objective adds no module: the image vector is the mean of the connector's output
tokens, the text vector the mean of the LLM's own input embeddings of the target tokens. Matching
images to texts (symmetric InfoNCE) teaches the encoder what the words distinguish — shape, colour,
place — and lands image features in the LLM's word-embedding space. Its negatives are every other
sample of the micro-batch *over all processes* (the vectors are gathered, as open_clip does), so one
process and N give the same loss; with ``grad_accum`` > 1 they are those of the micro-batch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..data.batching.batches import Batch
from ..data.chat import IGNORE
from ..data.pixels.processing import ImageBatch
from ..config import LOSS_KINDS, OBJECTIVE_NAMES, StageConfig
from ..errors import ConfigError
from ..image_tokenizers import counts_usage
from ..model import FusionLM
from .distributed import all_rows

TEMPERATURE = 0.07


@dataclass
class Loss:
    """A micro-batch's loss in one process, summed over its items."""

    train: torch.Tensor  # what this process back-propagates
    shown: torch.Tensor  # its part of the logged loss: the parts of all processes add up to the whole
    # sums the objective reports on (``Objective.report``), added up over micro-batches and processes
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """What a stage optimises; made per stage (``objective_for``), with that stage's settings."""

    name: ClassVar[str]
    packs: ClassVar[bool] = False  # its batches may be packed (several samples per row)
    # it sees each image whole: under tiling its loader cuts no tiles and gives it each image
    # letterboxed (a thumbnail's pixels), whatever model.tiling.thumbnail says
    whole: ClassVar[bool] = False

    def __init__(self, stage: StageConfig | None = None):
        self.stage = stage if stage is not None else StageConfig(objective=self.name)

    def report(self, stats: dict[str, list[float]]) -> dict[str, float]:
        """The metrics a step logs from its summed ``stats`` (none by default)."""
        return {}

    def items(self, batch: Batch) -> int:
        """How many items the loss of ``batch`` sums over."""
        raise NotImplementedError

    def loss(self, model: FusionLM, batch: Batch, group=None) -> Loss:
        raise NotImplementedError

    def idle(self, model: FusionLM, group=None) -> Loss:
        """A process without samples in this micro-batch: zero, while it joins the collectives that
        ``loss`` runs in the others (gathered vectors, sharded layers)."""
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def objective(cls: type[Objective]) -> type[Objective]:
    if cls.name not in OBJECTIVE_NAMES:  # the names a recipe may give (config.OBJECTIVE_NAMES)
        raise TypeError(f"objective {cls.name!r}: add it to fusionlm.config.schema.OBJECTIVE_NAMES")
    OBJECTIVES[cls.name] = cls
    return cls


def objective_for(stage: StageConfig) -> Objective:
    """The objective ``stage`` optimises, with its settings."""
    return OBJECTIVES[stage.objective](stage)


@objective
class LanguageModel(Objective):
    name = "lm"
    packs = True

    def items(self, batch: Batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE).sum())

    def loss(self, model: FusionLM, batch: Batch, group=None) -> Loss:
        weights = tuple(self.stage.loss_weights.get(kind, 1.0) for kind in LOSS_KINDS)
        out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                    labels=batch.labels, segment_ids=batch.segments, drawn=batch.drawn, loss_reduction="sum",
                    loss_weights=weights, return_logits=False, noise=batch.noise, times=batch.times)
        return Loss(out.loss, out.loss.detach(), out.loss_parts or {})

    def idle(self, model: FusionLM, group=None) -> Loss:
        ids = torch.full((1, 1), model.ids.pad, device=model.llm.get_input_embeddings().weight.device)
        zero = model(ids).logits.sum() * 0.0  # runs the (sharded) decoder layers as the others do
        # the sums FusionLM.loss gives a model that draws, each zero
        parts = {f"{kind}_{sum_}": zero.detach() for kind in LOSS_KINDS for sum_ in ("loss", "targets")}
        return Loss(zero, zero.detach(), parts if model.draws else {})

    def report(self, stats):
        """A model that draws: the mean loss of each kind of target (text tokens, image codes)."""
        return {f"loss_{kind}": stats[f"{kind}_loss"][0] / stats[f"{kind}_targets"][0]
                for kind in LOSS_KINDS if stats[f"{kind}_targets"][0]}


@objective
class Contrastive(Objective):
    """Symmetric InfoNCE between each sample's image and its target text (one image per sample)."""

    name = "contrastive"
    whole = True

    def items(self, batch: Batch) -> int:
        return batch.input_ids.shape[0]

    def loss(self, model: FusionLM, batch: Batch, group=None) -> Loss:
        return self._over_all(torch.cat(self.vectors(model, batch), dim=-1), group)

    def idle(self, model: FusionLM, group=None) -> Loss:
        weight = model.llm.get_input_embeddings().weight
        return self._over_all(weight.new_zeros((0, 2 * weight.shape[1])), group)

    @staticmethod
    def vectors(model: FusionLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) image vectors and (B, D) text vectors."""
        n = batch.input_ids.shape[0]
        pixels = whole_images(batch.pixels)
        count = 0 if pixels is None else len(pixels)
        if count != n:
            raise ConfigError(
                f"the contrastive objective needs exactly one image per sample; a batch of {n} samples "
                f"has {count} images (use single-image tasks such as caption)"
            )
        features = model.image_features(pixels)  # (B, N, D), images with fewer tokens zero-padded
        counts = torch.tensor(model.slot_tokens(pixels), device=features.device)
        real = (torch.arange(features.shape[1], device=features.device)[None] < counts[:, None]).unsqueeze(-1)  # (B, N, 1)
        image = (features * real).sum(1) / counts[:, None]  # (B, D): the mean of each image's real tokens
        targets = (batch.labels != IGNORE) & (batch.labels != model.ids.end)  # (B, T)
        embeds = model.llm.get_input_embeddings()(batch.input_ids)  # (B, T, D)
        text = (embeds * targets.unsqueeze(-1)).sum(1) / targets.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return image, text

    @staticmethod
    def _over_all(local: torch.Tensor, group) -> Loss:
        """The InfoNCE terms of every sample of the micro-batch over all processes (n local rows of
        [image | text], N in all): each process back-propagates all N terms (only its own rows carry
        gradient) and shows its own n."""
        both, start = all_rows(local, group)  # (N, 2D)
        image, text = both.chunk(2, dim=-1)  # (N, D) each
        logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / TEMPERATURE  # (N, N)
        labels = torch.arange(logits.shape[0], device=logits.device)
        terms = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                       + F.cross_entropy(logits.T, labels, reduction="none"))  # (N,)
        return Loss(terms.sum(), terms[start: start + local.shape[0]].sum().detach())


@objective
class Reconstruction(Objective):
    """The image tokenizer's own training: reconstruct the pictures the batch draws (``Batch.drawn``)
    through the codes, with the quantiser's commitment loss; PSNR and codebook use are logged
    every step, because a collapsing codebook is the known failure."""

    name = "reconstruction"

    def items(self, batch: Batch) -> int:
        return 0 if batch.drawn is None else len(batch.drawn)

    def loss(self, model: FusionLM, batch: Batch, group=None) -> Loss:
        if batch.drawn is None:
            raise ConfigError("the reconstruction objective trains the image tokenizer on the pictures a model draws; "
                              "this batch has none (use tasks whose answers are images, such as draw)")
        return self._run(model, batch.drawn)

    def idle(self, model: FusionLM, group=None) -> Loss:
        size = model.image_tokenizer.config.image_size
        return self._run(model, model.llm.get_input_embeddings().weight.new_zeros((0, 3, size, size)))

    @staticmethod
    def _run(model: FusionLM, pictures: torch.Tensor) -> Loss:
        tokenizer = model.image_tokenizer
        if tokenizer is None:
            raise ConfigError("the reconstruction objective trains model.image_tokenizer; this model has none")
        out = tokenizer(pictures)
        n = pictures.shape[0]
        total = out.loss * n if n else out.pixels.sum() * 0.0  # an empty batch: zero, the collectives joined
        error = ((out.pixels.detach().clamp(-1, 1) - pictures) ** 2).sum()
        stats = {"squared_error": error, "values": torch.tensor(float(pictures.numel())),
                 "codes": torch.bincount(out.codes.flatten(), minlength=tokenizer.codebook_size).double()}
        return Loss(total, total.detach(), stats)

    def report(self, stats):
        values = stats["values"][0]
        if not values:
            return {}
        mse = stats["squared_error"][0] / values
        return {"psnr": 10 * math.log10(4 / mse) if mse else float("inf"),
                **counts_usage(torch.tensor(stats["codes"]))}


def lm_loss(model: FusionLM, batch: Batch) -> torch.Tensor:
    """The mean next-token loss over ``batch``'s target tokens."""
    return model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                 labels=batch.labels, segment_ids=batch.segments).loss


def contrastive_loss(model: FusionLM, batch: Batch) -> torch.Tensor:
    """The mean symmetric InfoNCE over ``batch`` (one process)."""
    contrastive = OBJECTIVES["contrastive"]()
    return contrastive.loss(model, batch).train / contrastive.items(batch)


def whole_images(pixels: ImageBatch | None) -> ImageBatch | None:
    """The inputs that show each image whole: all of them, or with tiling the thumbnails (and the
    images that fit one tile, shown untiled under ``thumbnail_from: 2``)."""
    if pixels is None or not pixels.roles:
        return pixels
    keep = [i for i, role in enumerate(pixels.roles) if role in ("thumbnail", "image")]
    if not keep:
        raise ConfigError("the contrastive objective with tiling compares whole images: set model.tiling.thumbnail")
    return ImageBatch(pixels.pixel_values[keep], [pixels.grids[i] for i in keep],
                      {k: v[keep] for k, v in pixels.extras.items()})
