"""What a stage optimises. ``lm``: next-token loss on target tokens. ``contrastive``: CLIP-style
alignment of images with their texts, a cheap encoder pre-training stage (seed 003's lever).

The contrastive objective adds no module: the image vector is the mean of the connector's output
tokens, the text vector the mean of the LLM's own input embeddings of the target tokens. Matching
images to texts within a batch (symmetric InfoNCE) teaches the encoder what the words distinguish
— shape, colour, place — and lands image features in the LLM's word-embedding space, so the
language stage starts from an encoder whose features already separate the concepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batches import Batch
from ..data.chat import IGNORE
from ..data.processing import ImageBatch
from ..errors import ConfigError
from ..model import FusionLM

OBJECTIVES = ("lm", "contrastive")
TEMPERATURE = 0.07


def lm_loss(model: FusionLM, batch: Batch) -> torch.Tensor:
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                labels=batch.labels, segment_ids=batch.segments)
    return out.loss


def contrastive_loss(model: FusionLM, batch: Batch) -> torch.Tensor:
    """Symmetric InfoNCE between each sample's image and its target text (one image per sample)."""
    n = batch.input_ids.shape[0]
    images = whole_images(batch.images)
    count = 0 if images is None else len(images)
    if count != n:
        raise ConfigError(
            f"the contrastive objective needs exactly one image per sample; a batch of {n} samples "
            f"has {count} images (use single-image tasks such as caption)"
        )
    features = model.image_features(images)  # (B, N, D), images with fewer tokens zero-padded
    counts = torch.tensor(model.slot_tokens(images), device=features.device)
    real = (torch.arange(features.shape[1], device=features.device)[None] < counts[:, None]).unsqueeze(-1)  # (B, N, 1)
    image = (features * real).sum(1) / counts[:, None]  # (B, D): the mean of each image's real tokens
    targets = (batch.labels != IGNORE) & (batch.labels != model.ids.end)  # (B, T)
    embeds = model.llm.get_input_embeddings()(batch.input_ids)  # (B, T, D)
    text = (embeds * targets.unsqueeze(-1)).sum(1) / targets.sum(1, keepdim=True).clamp(min=1)  # (B, D)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / TEMPERATURE  # (B, B)
    labels = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def whole_images(images: ImageBatch | None) -> ImageBatch | None:
    """The inputs that show each image whole: all of them, or with tiling only the thumbnails."""
    if images is None or not images.roles:
        return images
    keep = [i for i, role in enumerate(images.roles) if role == "thumbnail"]
    if not keep:
        raise ConfigError("the contrastive objective with tiling compares whole images: set model.tiling.thumbnail")
    return ImageBatch(images.pixel_values[keep], [images.grids[i] for i in keep],
                      {k: v[keep] for k, v in images.extras.items()})


def loss_for(objective: str):
    return {"lm": lm_loss, "contrastive": contrastive_loss}[objective]
