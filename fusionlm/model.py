"""Model assembly: encoder + connector + LLM (+ cross-attention blocks), built from a ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .connectors import build_connector
from .encoders import build_encoder
from .errors import SampleError
from .fusion import CrossCall, CrossInputs, GatedCrossAttentionBlock, image_memory, scatter_image_features
from .llm import build_llm, decoder_layers


@dataclass
class ImageContext:
    """Image information for one batch, computed once per request and reused at every step.

    ``features`` (I, N, D) is what Method A scatters into the prefill; ``cross`` is what
    Method B's blocks attend to (keys/values already projected).
    """

    features: torch.Tensor | None = None
    cross: CrossInputs | None = None


@dataclass
class Output:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None
    past_key_values: object | None = None


@dataclass
class SpecialIds:
    image: int
    newline: int
    pad: int
    end: int


class FusionLM(nn.Module):
    """A multimodal LLM in one of the fusion designs of ``config.fusion.kind``."""

    def __init__(self, config: ModelConfig, ids: SpecialIds):
        super().__init__()
        self.config = config
        self.ids = ids
        self.fusion = config.fusion.kind
        self.encoder = build_encoder(config.encoder)
        self.llm = build_llm(config.llm, pad_token_id=ids.pad)
        width = self.llm.config.hidden_size
        self.connector = build_connector(config.connector, self.encoder.out_dim, width, self.encoder.grid)
        self.cross_blocks = nn.ModuleDict()
        if self.fusion == "cross_attention":
            self._add_cross_attention()

    # ------------------------------------------------------------------ Method B wiring

    def _add_cross_attention(self) -> None:
        hf = self.llm.config
        layers = decoder_layers(self.llm)
        f = self.config.fusion
        for i in range(f.first_layer, len(layers), f.every_n):
            self.cross_blocks[str(i)] = GatedCrossAttentionBlock(
                hf.hidden_size, hf.num_attention_heads,
                getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads, hf.intermediate_size,
            )
        # The LLM stays an unmodified module (its state-dict names are the original ones); each
        # block runs just before its layer, on inputs handed over in that call's kwargs.
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._cross_hook(i), with_kwargs=True)

    def _cross_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            cross: CrossCall | None = kwargs.pop("cross_inputs", None)
            block = self.cross_blocks[str(index)] if str(index) in self.cross_blocks else None
            if cross is None or block is None:
                return args, kwargs
            if args:
                hidden = args[0]
                hidden = block(hidden, cross.kv[index], cross.visible)
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = block(kwargs["hidden_states"], cross.kv[index], cross.visible)
            return args, kwargs

        return hook

    # ------------------------------------------------------------------ tokens per image

    @property
    def tokens_per_image(self) -> int:
        """Decoder positions one image takes (1 marker for Method B)."""
        return len(self.image_layout())

    def image_layout(self) -> list[int]:
        """Token ids that stand for one image in the decoder sequence."""
        if self.fusion == "cross_attention":
            return [self.ids.image]
        rows, cols = self.connector.grid
        if self.fusion == "fuyu":
            return ([self.ids.image] * cols + [self.ids.newline]) * rows
        return [self.ids.image] * (rows * cols)

    # ------------------------------------------------------------------ forward

    def encode_images(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> ImageContext:
        """Pixels (I, 3, H, W) of the images of ``input_ids`` (B, T) -> what the decoder needs."""
        features = self.connector(self.encoder(pixel_values))  # (I, N, D)
        if self.fusion != "cross_attention":
            return ImageContext(features=features)
        memory, slot_marker = image_memory(features, input_ids == self.ids.image)  # (B, S, D), (B, S)
        kv = {int(i): block.project_kv(memory) for i, block in self.cross_blocks.items()}
        return ImageContext(cross=CrossInputs(kv=kv, slot_marker=slot_marker))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        images: ImageContext | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        query_start: int = 0,
    ) -> Output:
        """Args:
            input_ids: (B, T) with image layouts already expanded.
            pixel_values: (I, 3, H, W) images of the batch in order; or pass ``images``.
            labels: (B, T), -100 where no loss is taken; the shift happens here.
            query_start: sequence index of input_ids[:, 0] (the KV-cache length when decoding).
        """
        if images is None and pixel_values is not None and pixel_values.shape[0] > 0:
            images = self.encode_images(pixel_values, input_ids)
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        image_mask = input_ids == self.ids.image  # (B, T)
        if images is None and image_mask.any():
            # Else the image tokens would silently run as plain text tokens.
            raise SampleError(f"the batch has {int(image_mask.sum())} image-token positions but no images")
        extra = {}
        if images is not None and images.features is not None:
            if image_mask.any():
                embeds = scatter_image_features(embeds, image_mask, images.features)
        if images is not None and images.cross is not None:
            extra["cross_inputs"] = images.cross.for_call(input_ids.shape[1], query_start)
        out = self.llm(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, **extra,
        )
        logits = out.logits  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return Output(logits=logits, loss=loss, past_key_values=out.past_key_values if use_cache else None)

    # ------------------------------------------------------------------ parameter groups

    def part_of(self, name: str) -> str:
        """Which part a parameter belongs to: encoder, connector, llm or cross_attention."""
        head = name.split(".", 1)[0]
        return {"cross_blocks": "cross_attention"}.get(head, head)
