"""Model assembly: encoder + connector + LLM (+ cross-attention blocks), built from a ModelConfig."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .connectors import build_connector
from .data.layout import ImageLayout, SpecialIds
from .data.batching.packing import segment_mask, segment_positions
from .data.pixels.processing import ImageBatch
from .designs import design_of
from .encoders import build_encoder
from .generators import Noised, generator_of
from .image_tokenizers import build_image_tokenizer
from .errors import ConfigError, SampleError
from .fusion import (
    CrossCall, GatedCrossAttentionBlock, ImageContext, cross_layer, native_cross_inputs, scatter_image_features,
)
from .linear_ce import linear_cross_entropy
from .llm import build_llm, decoder_layers, dims, is_mllama_text


# Causal LMs whose logits are their LM head on the decoder's last hidden state, nothing more: with
# labels, fusionlm runs the head on the target positions alone (``FusionLM.forward``). Others (a
# soft-capped or scaled head, say) go through their own forward.
HEAD_ONLY = ("llama", "mistral", "qwen2", "gpt2", "mllama_text_model", "emu3_text_model")


@dataclass
class Output:
    logits: torch.Tensor | None  # (B, T, V) text logits (a shared head's code columns at -inf); None: not asked
    loss: torch.Tensor | None = None
    past_key_values: object | None = None
    code_logits: torch.Tensor | None = None  # (B, T, K) a model that draws: the next code's scores
    velocity: torch.Tensor | None = None  # (G, n, C) a diffusion design given pictures: their predicted velocity
    # a model that draws, with labels: each kind's summed loss and target count, unweighted (detached)
    loss_parts: dict[str, torch.Tensor] | None = None


class FusionLM(nn.Module):
    """A multimodal LLM in the fusion design that ``config.fusion.kind`` names (``designs.DESIGNS``)."""

    def __init__(self, config: ModelConfig, ids: SpecialIds, *, pretrained: bool = True, vocab_size: int | None = None):
        """``pretrained``: load ``hf`` parts' weights (False when a checkpoint's weights follow).
        ``vocab_size``: grow the LLM's embeddings to at least this many rows (added tokens)."""
        super().__init__()
        self.config = config = copy.deepcopy(config)  # the model's own record: parts fill in their ``arch``
        self.ids = ids
        self.adapters: dict[str, dict] = {}  # {part: settings} of the LoRA adapters injected now (``lora``)
        self.design = design_of(config.fusion.kind)
        self.encoder = build_encoder(config.encoder, pretrained=pretrained)
        self.llm = build_llm(config.llm, pad_token_id=ids.pad, pretrained=pretrained)
        rows = self.llm.get_input_embeddings().weight.shape[0]
        if vocab_size is not None and vocab_size > rows:
            self.llm.resize_token_embeddings(vocab_size, mean_resizing=False)
        self._add_generation()
        if config.llm.arch is not None and self.llm.get_input_embeddings().weight.shape[0] != rows:
            config.llm.arch["vocab_size"] = self.llm.config.vocab_size
        width = self.llm.config.hidden_size
        self.connector = build_connector(config.connector, self.encoder.out_dim, width, self.encoder.grid)
        self.cross_blocks = nn.ModuleDict()
        self.native_cross = is_mllama_text(self.llm)  # the LLM brings its own cross-attention layers
        if self.native_cross and not self.design.native_layers:
            raise ConfigError("model.fusion.kind: a Llama 3.2 Vision decoder needs fusion 'cross_attention'")
        if self.design.cross and not self.native_cross:
            self._add_cross_attention()

    # ------------------------------------------------------------------ drawing

    def _add_generation(self) -> None:
        """The image tokenizer and the generation design's modules (``generators``); the id of code 0
        is recorded in the model's config the first time, so a rebuilt model finds its codes again."""
        config = self.config
        self.generation = generator_of(config.generation.kind)
        self.image_tokenizer = None
        if config.image_tokenizer is not None:
            self.image_tokenizer = build_image_tokenizer(config.image_tokenizer)
            config.image_tokenizer = self.image_tokenizer.config  # as settled (a pretrained one's grid)
        if not self.generation.draws:
            self.code_offset = None
            return
        if self.image_tokenizer is None:
            raise ConfigError(f"model.image_tokenizer: the {self.generation.name!r} generation needs one")
        text = config.generation.code_offset or self.llm.get_input_embeddings().weight.shape[0]
        self.code_offset = self.generation.build(self, text)
        config.generation.code_offset = self.code_offset

    @property
    def draws(self) -> bool:
        return self.code_offset is not None

    def code_ids(self, device=None) -> torch.Tensor:
        """(K,) the ids of the codes."""
        return torch.arange(self.image_tokenizer.codebook_size, device=device) + self.code_offset

    def with_codes(self, ids: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, T) with the ``<image_code>`` positions of the drawn images ``drawn`` (G, 3, H, W),
        in order, holding their codes' ids (``code_offset + code``, raster order)."""
        slots = ids == self.ids.code  # (B, T)
        codes = self.image_tokenizer.encode(drawn).flatten(1)  # (G, h*w)
        if int(slots.sum()) != codes.numel():
            raise SampleError(f"the batch has {int(slots.sum())} image-code positions but its {len(drawn)} drawn "
                              f"image(s) have {codes.numel()} codes")
        out = ids.clone()
        out[slots] = codes.flatten().to(ids.device) + self.code_offset
        return out

    @torch.no_grad()
    def coded(self, ids: list[int], pictures: list[torch.Tensor]) -> list[int]:
        """One prompt's ids with the ``<image_code>`` positions of its ``pictures`` (each (3, S, S))
        holding their codes: how a prompt reads pictures as codes (the early fusion) before decoding."""
        if not pictures:
            return ids
        device = self.llm.get_input_embeddings().weight.device
        return self.with_codes(torch.tensor([ids], device=device), torch.stack(pictures).to(device))[0].tolist()

    # ------------------------------------------------------------------ Method B wiring

    def _add_cross_attention(self) -> None:
        d = dims(self.llm.config)
        layers = decoder_layers(self.llm)
        f = self.config.fusion
        for i in range(f.first_layer, len(layers), f.every_n):
            self.cross_blocks[str(i)] = GatedCrossAttentionBlock(d.hidden, d.heads, d.kv_heads, d.ffn)
        # The LLM stays an unmodified module (its state-dict names are the original ones); each
        # block runs just before its layer, on inputs handed over in that call's kwargs.
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._cross_hook(i), with_kwargs=True)

    def _cross_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call: CrossCall | None = kwargs.pop("cross_inputs", None)
            if call is None:
                return args, kwargs
            call.reached.add(index)
            if args:
                return (cross_layer(self.cross_blocks, index, args[0], call), *args[1:]), kwargs
            kwargs["hidden_states"] = cross_layer(self.cross_blocks, index, kwargs["hidden_states"], call)
            return args, kwargs

        return hook

    # ------------------------------------------------------------------ tokens per image

    @property
    def layout(self) -> ImageLayout:
        rule = type(self.connector).grid_rule(self.config.connector)
        marker = self.config.tiling.marker if self.config.tiling.max_tiles else "none"
        bracket = (self.ids.image_begin, self.ids.image_end) if self.ids.image_begin >= 0 else None
        return ImageLayout(self.design.sequence, self.ids.image, self.ids.newline, rule, marker, self.ids.tile_tags,
                           bracket)

    @property
    def tokens_per_image(self) -> int:
        """Decoder positions an image of the configured size takes (1 marker for Method B)."""
        return len(self.image_layout())

    def image_layout(self, grid: tuple[int, int] | None = None) -> list[int]:
        """Token ids that stand for one image whose encoder grid is ``grid`` (default: the configured size)."""
        return self.layout.tokens(grid or self.encoder.grid)

    # ------------------------------------------------------------------ forward

    def image_features(self, pixels: ImageBatch) -> torch.Tensor:
        """Connector outputs (S, N, D), one per image slot; images with fewer tokens are zero-padded
        to N. Video frames are encoded as images, then each group of ``temporal_pool`` consecutive
        frames is averaged into one slot (``ImageBatch.pool``); without video S = I."""
        return pixels.pool(self.connector(self.encoded(pixels), pixels.grids))  # (S, N, D)

    def encoded(self, pixels: ImageBatch) -> torch.Tensor:
        """The encoder's outputs (I, N, De). A frozen encoder without dropout gives a repeated image
        the same features, so it runs once per distinct image of the batch."""
        distinct = pixels.distinct() if self._encoder_fixed() else None
        if distinct is None:
            return self.encoder(pixels)
        once, index = distinct
        return self.encoder(once)[index]  # (I, N, De)

    def _encoder_fixed(self) -> bool:
        """The encoder is a fixed function here: nothing of it trains, and no dropout is active."""
        if any(p.requires_grad for p in self.encoder.parameters()) and torch.is_grad_enabled():
            return False
        if not self.encoder.training:
            return True
        for m in self.encoder.modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                return False
            if getattr(getattr(m, "config", None), "attention_dropout", 0.0):  # transformers' attention
                return False
        return True

    def slot_tokens(self, pixels: ImageBatch) -> list[int]:
        """Real (unpadded) connector tokens of each image slot of ``pixels``."""
        return [r * c for r, c in map(self.layout.grid, pixels.slot_grids)]

    def encode_images(self, pixels: ImageBatch | torch.Tensor, input_ids: torch.Tensor) -> ImageContext:
        """The images of ``input_ids`` (B, T), in order -> the ``context`` the decoder reads."""
        if isinstance(pixels, torch.Tensor):
            pixels = ImageBatch.of(pixels, self.encoder.grid)
        features = self.image_features(pixels)  # (I, N, D)
        return self.design.context(self, pixels, features, self.slot_tokens(pixels), input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | ImageBatch | None = None,
        context: ImageContext | None = None,
        labels: torch.Tensor | None = None,
        drawn: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        query_start: int = 0,
        segment_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        loss_weights: tuple[float, float] = (1.0, 1.0),
        return_logits: bool = True,
        noise: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        pictures: Noised | None = None,
    ) -> Output:
        """Args:
            input_ids: (B, T) with image layouts already expanded.
            pixel_values: the batch's images in order (an ``ImageBatch``, or (I, 3, H, W) of the
                configured size); or pass ``context``, the images already encoded.
            labels: (B, T), -100 where no loss is taken; the shift happens here.
            drawn: (G, 3, H, W) in [-1, 1], the images the sequences draw, in order: their
                ``<image_code>`` positions (in ``input_ids`` and ``labels``) become their codes.
            query_start: sequence index of input_ids[:, 0] (the KV-cache length when decoding).
            segment_ids: (B, T) packed rows (``data.batching.packing``): attention, to text and to images,
                stays inside each sample and positions restart at each (overrides ``attention_mask`` and
                ``position_ids``).
            loss_reduction: ``mean`` over the target tokens, or their ``sum`` (the training loop
                divides by the whole step's count, over micro-batches and processes).
            loss_weights: a model that draws: the weight of text targets and of code targets.
            return_logits: with ``labels``, False: only the loss is wanted (training), so the LM head runs
                on the target positions alone (``loss_rows``) and no logits are returned.
            noise, times: a diffusion design: each drawn picture's noise (G, 3, H, W) and noise level
                (G,) (``Batch.noise``, ``Batch.times``).
            pictures: a diffusion design drawing: the noised patches its ``<image_code>`` positions
                read (``generators.Noised``); the output's ``velocity`` is predicted for them.
        """
        if drawn is not None and len(drawn) > 0 and self.generation.noised:
            pictures = self.generation.noise(self, drawn, noise, times)
        elif drawn is not None and len(drawn) > 0:
            masked = input_ids == self.generation.mask_id(self)  # (B, T): codes a masked design hides (DrawLayout.masked)
            filled = self.with_codes(input_ids.masked_fill(masked, self.ids.code), drawn)
            labels = None if labels is None else torch.where(labels == self.ids.code, filled, labels)
            input_ids = torch.where(masked, input_ids, filled)
        blocks = self.generation.blocks(self, input_ids) if self.draws else None  # (B, T) or None: causal
        if segment_ids is not None or blocks is not None:
            segments = segment_ids if segment_ids is not None else (
                attention_mask.long() if attention_mask is not None else torch.ones_like(input_ids))  # (B, T)
            position_ids = segment_positions(segments) if segment_ids is not None else position_ids
            attention_mask = segment_mask(segments, self.llm.get_input_embeddings().weight.dtype, blocks)  # (B, 1, T, T)
        if context is None and pixel_values is not None and len(pixel_values) > 0:
            context = self.encode_images(pixel_values, input_ids)
        embeds, extra = self.embed(input_ids, context, query_start, cached=past_key_values is not None,
                                   segments=segment_ids, pictures=pictures)
        if pictures is not None:
            return self._with_pictures(embeds, extra, attention_mask, position_ids, input_ids, labels, pictures,
                                       loss_reduction, loss_weights)
        if labels is not None and not return_logits and not use_cache and self.llm.config.model_type in HEAD_ONLY:
            # the LM head (and a generation head) on the target positions alone: the same loss, a
            # fraction of the head's work, the full logits never made
            last = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                          position_ids=position_ids, **extra).last_hidden_state  # (B, T, D)
            self._check_reached(extra)
            at = labels[:, 1:] != -100  # (B, T-1)
            loss, parts = self.loss_rows(last[:, :-1][at], labels[:, 1:][at], loss_reduction, loss_weights)
            return Output(logits=None, loss=loss, loss_parts=parts)
        hidden = self.draws and self.generation.needs_hidden
        out = self.llm(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, output_hidden_states=hidden or None, **extra,
        )
        self._check_reached(extra)
        logits, codes = out.logits, None  # (B, T, V)
        if self.draws:
            codes = self.generation.code_logits(self, logits, out.hidden_states[-1] if hidden else None)  # (B, T, K)
            logits = self.generation.text_logits(self, logits)
        loss = parts = None
        if labels is not None:
            loss, parts = self.loss(logits, codes, labels, loss_reduction, loss_weights)
        return Output(logits=logits, loss=loss, past_key_values=out.past_key_values if use_cache else None,
                      code_logits=codes, loss_parts=parts)

    def _with_pictures(self, embeds, extra, attention_mask, position_ids, input_ids, labels, pictures, reduction,
                       weights) -> Output:
        """A diffusion design's pass over sequences holding noised pictures: text logits and, at the
        pictures' positions, the predicted velocity; with labels, the text's next-token loss (the
        pictures' positions are not text targets) plus ``weights[1]`` x the summed MSE of the
        velocity per patch (a patch counts as one target, as a code does)."""
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       output_hidden_states=True, **extra)
        self._check_reached(extra)
        slots = input_ids == self.ids.code  # (B, T)
        velocity = self.generation.velocity(self, out.hidden_states[-1][slots])  # (G*n, C)
        logits = out.logits  # (B, T, V)
        if labels is None:
            return Output(logits=logits, velocity=velocity.view(*pictures.patches.shape))
        text = labels.masked_fill(labels == self.ids.code, -100)  # (B, T)
        at = text[:, 1:] != -100  # (B, T-1)
        text_total, parts = self._loss(logits[:, :-1][at], None, text[:, 1:][at], "sum", weights)
        image_sum = (velocity.float() - pictures.target.flatten(0, 1).float()).pow(2).mean(-1).sum()
        parts["image_loss"], parts["image_targets"] = image_sum.detach(), parts["image_targets"] + velocity.shape[0]
        total = text_total + weights[1] * image_sum
        count = parts["text_targets"] + parts["image_targets"]
        return Output(logits=logits, loss=total if reduction == "sum" else total / count.clamp(min=1),
                      velocity=velocity.view(*pictures.patches.shape), loss_parts=parts)

    def _check_reached(self, extra: dict) -> None:
        call = extra.get("cross_inputs")
        if call is not None and len(call.reached) != len(decoder_layers(self.llm)):
            raise RuntimeError(f"cross-attention reached {len(call.reached)} of {len(decoder_layers(self.llm))} "
                               "decoder layers: this transformers version does not hand a layer's keyword "
                               "arguments on to it (fusionlm's hooks need that)")

    def loss(self, logits: torch.Tensor, codes: torch.Tensor | None, labels: torch.Tensor, reduction: str,
             weights: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, dict | None]:
        """``loss_rows`` from the logits (B, T, V) (and a model that draws, the code logits (B, T, K))
        at every position: those of the target positions are taken."""
        at = labels[:, 1:] != -100  # (B, T-1)
        return self._loss(logits[:, :-1][at], None if codes is None else codes[:, :-1][at], labels[:, 1:][at],
                          reduction, weights)

    def loss_rows(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str,
                  weights: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, dict | None]:
        """The loss of the last hidden states (N, D) of the N positions that have a target (N,): the
        LM head (and a generation head) run on those rows alone; a plain linear head of a model that
        does not draw, chunk by chunk, so that the (N, V) logits are never held (``linear_ce``)."""
        head = self.llm.get_output_embeddings()
        if not self.draws and type(head) is torch.nn.Linear:
            return linear_cross_entropy(hidden, head.weight, head.bias, targets, reduction=reduction), None
        logits = head(hidden)  # (N, V)
        codes = self.generation.code_logits(self, logits, hidden) if self.draws else None  # (N, K)
        return self._loss(logits, codes, targets, reduction, weights)

    def _loss(self, logits: torch.Tensor, codes: torch.Tensor | None, targets: torch.Tensor, reduction: str,
              weights: tuple[float, float]) -> tuple[torch.Tensor, dict | None]:
        """Next-token cross-entropy of N target rows: text targets over the text logits (N, V), and,
        for a model that draws, code targets over the code logits (N, K) alone; ``weights``: (text,
        codes). Also, for a model that draws, each kind's unweighted sum and count."""
        if codes is None and not self.draws:
            return F.cross_entropy(logits.float(), targets, reduction=reduction), None
        if codes is None:  # a design without codes (diffusion): its text rows (the patches' loss is _with_pictures')
            text = F.cross_entropy(logits.float(), targets, reduction="sum")
            none = torch.zeros((), dtype=torch.long, device=targets.device)
            parts = {"text_loss": text.detach(), "text_targets": none + targets.numel(), "image_loss": text.detach() * 0,
                     "image_targets": none}
            return (weights[0] * text if reduction == "sum" else weights[0] * text / max(1, targets.numel())), parts
        logits = self.generation.text_logits(self, logits)
        is_code = (targets >= self.code_offset) & (targets < self.code_offset + codes.shape[-1])  # (N,)
        is_text = ~is_code
        text = F.cross_entropy(logits[is_text].float(), targets[is_text], reduction="sum")
        image = F.cross_entropy(codes[is_code].float(), targets[is_code] - self.code_offset, reduction="sum")
        total = weights[0] * text + weights[1] * image
        parts = {"text_loss": text.detach(), "text_targets": is_text.sum(), "image_loss": image.detach(),
                 "image_targets": is_code.sum()}
        return (total if reduction == "sum" else total / targets.numel() if targets.numel() else total), parts

    def embed(self, input_ids: torch.Tensor, context: ImageContext | None, query_start: int = 0, *,
              cached: bool = False, segments: torch.Tensor | None = None, pictures=None) -> tuple[torch.Tensor, dict]:
        """The decoder's inputs for ``input_ids`` (B, T): embeddings (B, T, D) with Method A's image
        features in place, and the keyword arguments Method B's layers need for this call.

        ``cached``: a KV cache already holds the earlier positions (Llama 3.2 Vision's layers then
        keep the image keys/values from the first call). ``segments``: (B, T) packed rows; each
        sample's text sees only its own images.
        """
        table = self.llm.get_input_embeddings()
        if self.draws:  # code ids past the table (decoupled) are embedded by the generation design
            lookup = input_ids.masked_fill(input_ids >= table.weight.shape[0], self.ids.pad)
            embeds = self.generation.embed_codes(self, table(lookup), input_ids, pictures)  # (B, T, D)
        else:
            embeds = table(input_ids)  # (B, T, D)
        image_mask = input_ids == self.ids.image  # (B, T)
        if context is None and image_mask.any():
            # Else the image tokens would silently run as plain text tokens.
            raise SampleError(f"the batch has {int(image_mask.sum())} image-token positions but no images")
        extra = {}
        if context is not None and context.features is not None:
            if image_mask.any():
                embeds = scatter_image_features(embeds, image_mask, context.features)
        if context is not None and context.cross is not None:
            call = context.cross.for_call(input_ids.shape[1], query_start, segments)
            if self.native_cross:
                fresh = not cached or query_start == 0  # else the cache holds the image keys/values
                extra.update(native_cross_inputs(call, context.cross.memory if fresh else None, embeds.dtype))
            else:
                extra["cross_inputs"] = call
        return embeds, extra

    # ------------------------------------------------------------------ parameter groups

    def part_of(self, name: str) -> str:
        """Which part a parameter belongs to: encoder, connector, llm or cross_attention."""
        head = name.split(".", 1)[0]
        if self.native_cross and head == "llm":
            parts = name.split(".")
            if parts[1:3] == ["model", "layers"] and int(parts[3]) in self.llm.config.cross_attention_layers:
                return "cross_attention"
        if head.startswith("gen_"):
            return "generation"
        return {"cross_blocks": "cross_attention"}.get(head, head)
