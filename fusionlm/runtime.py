"""A lean inference path for Llama-family decoders: a static KV cache and one plain loop over the
layers, on the LLM's own modules and weights.

transformers' forward pass is general (any cache class, mask function, output recording…), and at
the sizes where decoding is bound by Python and dispatch rather than arithmetic, that generality
is most of the time per token. ``StaticDecoder`` keeps what a Llama, Mistral or Qwen2 layer
computes: the projections, norms and MLP are the modules' own calls (so LoRA-wrapped or
quantised linears still work); rotary tables, the cache and the masks are made once per request.
Only the last position's logits are computed. Method B's gated blocks run before their layers
through ``fusion.cross_layer``, as the hooks of the general path do. With ``compile=True`` the decoding step (every layer, at
one new position) goes through ``torch.compile``: the cache length is rounded up to a power of
two and each step attends to all of it under a mask, so every step has the same shapes and one
compiled graph serves a whole request, and later requests of the same batch size and bucket. Anything else (GPT-2, Llama 3.2 Vision's decoder, sliding
windows, dynamic RoPE) goes through the general path: ``unsupported`` says why.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .fusion import ImageContext, cross_layer
from .model import FusionLM

FAMILIES = ("llama", "mistral", "qwen2", "emu3_text_model")  # Emu3's text model is a Llama (with dropout)


def unsupported(model: FusionLM, length: int) -> str | None:
    """Why ``model`` cannot decode ``length`` positions here (None: it can)."""
    config = model.llm.config
    if model.native_cross:
        return "Llama 3.2 Vision's decoder has cross-attention layers of its own"
    if config.model_type not in FAMILIES:
        return f"{config.model_type!r} is not one of {', '.join(FAMILIES)}"
    if "dynamic" in getattr(model.llm.get_decoder().rotary_emb, "rope_type", "default"):
        return "dynamic RoPE rescales with the sequence length"
    window = getattr(config, "sliding_window", None)
    if window is not None and length > window:
        return f"the sequence ({length}) is longer than the sliding window ({window})"
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, H, T, hd), halves rotated as in Llama: x·cos + (-x₂, x₁)·sin, written as
    x·cos + roll(x)·(-sin₁, sin₂) to save three operations. cos, signed_sin: (B, 1, T, hd)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """A Llama-family RMSNorm module applied to x: torch's fused kernel in fp32 (the module's
    own steps in lower precision, where it upcasts in between)."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class StaticDecoder:
    """Prefill and decode of one batch of requests over a preallocated KV cache of ``length``."""

    def __init__(self, model: FusionLM, batch: int, length: int, *, compile: bool = False):
        self.model, self.compiled = model, compile
        if compile:
            length = 1 << (length - 1).bit_length()  # a few buckets: few recompilations
        llm = model.llm
        body = llm.get_decoder()
        self.layers, self.norm, self.head = body.layers, body.norm, llm.get_output_embeddings()
        config = llm.config
        self.kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.gqa = self.kv_heads != config.num_attention_heads
        attn = self.layers[0].self_attn
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        weight = self.head.weight
        shape = (batch, self.kv_heads, length, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.layers]  # each (B, Hkv, L, hd)
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=weight.device)  # (B, L) real keys
        positions = torch.arange(length, device=weight.device)[None]  # (1, L)
        cos, sin = body.rotary_emb(weight, positions)  # each (1, L, hd)
        half = sin.shape[-1] // 2
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # each (L, hd)
        self.padded = False
        self.blocks = model.cross_blocks

    def _mask(self, start: int, end: int) -> tuple[torch.Tensor | None, bool]:
        """The attention mask of queries ``start … end-1`` and whether SDPA's own causal mask does."""
        if not self.padded:
            return None, start == 0 and end > 1
        q = torch.arange(start, end, device=self.valid.device)[:, None]  # (T, 1)
        k = torch.arange(end, device=self.valid.device)[None]  # (1, S)
        mask = (k <= q) & self.valid[:, None, :end]  # (B, T, S)
        mask |= k == q  # a padding query sees itself: no empty row, no NaN in its cached values
        return mask[:, None], False  # (B, 1, T, S)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context: ImageContext | None) -> torch.Tensor:
        """The prompts (B, T), left-padded where ``attention_mask`` is 0 -> next-token logits (B, V)."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): padding shifts positions
        self.context, self.next_position, self.length = context, positions[:, -1:] + 1, input_ids.shape[1]
        return self(input_ids, attention_mask, positions, context, 0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> next-token logits (B, V)."""
        if self.compiled:
            logits = self._compiled_step(tokens)
        else:
            logits = self(tokens[:, None], None, self.next_position, self.context, self.length)
        self.next_position, self.length = self.next_position + 1, self.length + 1
        return logits

    @torch.no_grad()
    def _compiled_step(self, tokens: torch.Tensor) -> torch.Tensor:
        x, extra = self.model.embed(tokens[:, None], self.context, self.length, cached=True)  # (B, 1, D)
        self.valid[:, self.length] = True
        mask = self.valid[:, None, None, :]  # (B, 1, 1, L): the real keys so far, nothing ahead
        at = torch.tensor([self.length], device=x.device)  # where the new keys/values go
        return compiled_layers()(self, x, self.next_position, mask, False, extra.get("cross_inputs"), at, None)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, new_valid: torch.Tensor | None, position_ids: torch.Tensor,
                 context: ImageContext | None, start: int) -> torch.Tensor:
        """Runs ``input_ids`` (B, T) at cache positions ``start …``; returns the last position's
        logits (B, V).

        ``new_valid`` (B, T): False at left padding (None: all real); ``position_ids`` (B, T): RoPE positions.
        """
        end = start + input_ids.shape[1]
        x, extra = self.model.embed(input_ids, context, start, cached=start > 0)  # (B, T, D)
        cross = extra.get("cross_inputs")
        if new_valid is None:
            self.valid[:, start:end] = True
        else:
            self.valid[:, start:end] = new_valid.bool()
            self.padded = self.padded or not bool(new_valid.all())
        mask, causal = self._mask(start, end)
        return layers(self, x, position_ids, mask, causal, cross, start, end)


def layers(dec: StaticDecoder, x: torch.Tensor, position_ids: torch.Tensor, mask, causal: bool, cross,
           start: int | torch.Tensor, end: int | None) -> torch.Tensor:
    """Every layer on x (B, T, D) -> the last position's logits (B, V). The new keys/values go to
    cache positions ``start … end-1`` and attention reads ``… end-1``; or (a compiled step) to the
    positions in the tensor ``start``, attention reading the whole cache under ``mask``; or, ``start``
    (B, 1), one new position per row at a column of its own (``SlotDecoder``), likewise."""
    cos, sin = dec.cos[position_ids][:, None], dec.sin[position_ids][:, None]  # (B, 1, T, hd)
    for i, layer in enumerate(dec.layers):
        x = cross_layer(dec.blocks, i, x, cross)  # (B, T, D)
        attn, h = layer.self_attn, rms_norm(layer.input_layernorm, x)
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, -1, dec.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = attn.k_proj(h).view(b, t, -1, dec.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = attn.v_proj(h).view(b, t, -1, dec.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        keys, values = dec.keys[i], dec.values[i]  # each (B, Hkv, L, hd)
        if isinstance(start, torch.Tensor) and start.dim() == 2:  # (B, 1): a column of its own per row
            rows = torch.arange(b, device=x.device)
            keys[rows, :, start[:, 0]] = rotate(k, cos, sin)[:, :, 0]  # (B, Hkv, hd) each
            values[rows, :, start[:, 0]] = v[:, :, 0]
        elif isinstance(start, torch.Tensor):
            keys.index_copy_(2, start, rotate(k, cos, sin))
            values.index_copy_(2, start, v)
        else:
            keys[:, :, start:end] = rotate(k, cos, sin)
            values[:, :, start:end] = v
            keys, values = keys[:, :, :end], values[:, :, :end]
        out = F.scaled_dot_product_attention(rotate(q, cos, sin), keys, values, attn_mask=mask, is_causal=causal,
                                             scale=dec.scale, enable_gqa=dec.gqa)  # (B, H, T, hd)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
    return dec.head(rms_norm(dec.norm, x[:, -1]))  # (B, V)


@functools.cache
def compiled_layers():
    """``layers`` through torch.compile, made once per process (its graphs are cached by shape)."""
    return torch.compile(layers, dynamic=False)


class SlotDecoder(StaticDecoder):
    """Continuous batching over a preallocated KV cache: ``slots`` rows of ``length`` positions,
    each row a request of its own that starts at column 0 and advances one column a step.

    A request joins between steps (``admit``: its prompt prefilled into the next free row) and
    leaves when it is done (``release``: the last active row moves into its place), so the active
    requests are always rows ``0 … active-1`` and a step runs on those alone. Every step attends
    over the whole cache under each row's own mask, so a request's numbers do not depend on the
    lengths of the others beside it. For designs whose pictures reach the decoder through the
    prompt's positions only (not through cross-attention).
    """

    def __init__(self, model: FusionLM, slots: int, length: int):
        super().__init__(model, slots, length)
        self.active = 0
        self.columns = torch.zeros(slots, 1, dtype=torch.long, device=self.valid.device)  # (S, 1) next column

    @property
    def free(self) -> int:
        return self.valid.shape[0] - self.active

    def admit(self, input_ids: torch.Tensor, context: ImageContext | None) -> torch.Tensor:
        """One prompt (T,) into the next free row -> its next-token logits (V,). Returns in the row
        ``active - 1``."""
        if not self.free:
            raise RuntimeError("no free slot")
        row, t = self.active, input_ids.shape[0]
        view = _Rows(self, row, row + 1)
        x, _ = self.model.embed(input_ids[None], context, 0)  # (1, T, D)
        self.valid[row] = False
        self.valid[row, :t] = True
        positions = torch.arange(t, device=x.device)[None]  # (1, T)
        logits = layers(view, x, positions, None, t > 1, None, 0, t)  # (1, V)
        self.columns[row] = t
        self.active += 1
        return logits[0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per active row (A,) -> next-token logits (A, V)."""
        a = self.active
        view = _Rows(self, 0, a)
        x, _ = self.model.embed(tokens[:, None], None, 0)  # (A, 1, D)
        columns = self.columns[:a]  # (A, 1)
        self.valid[torch.arange(a, device=x.device), columns[:, 0]] = True
        mask = self.valid[:a, None, None, :]  # (A, 1, 1, L): each row's own keys
        logits = layers(view, x, columns, mask, False, None, columns, self.valid.shape[1])  # (A, V)
        self.columns[:a] += 1
        return logits

    def release(self, row: int) -> int | None:
        """Frees ``row``; the last active row moves into it. Returns the row that moved (None: none)."""
        last = self.active - 1
        if row != last:
            for cache in (*self.keys, *self.values):
                cache[row] = cache[last]
            self.valid[row], self.columns[row] = self.valid[last], self.columns[last]
        self.valid[last] = False
        self.active = last
        return last if row != last else None

    def room(self, row: int) -> int:
        """Positions left in ``row``."""
        return self.valid.shape[1] - int(self.columns[row])


class _Rows:
    """Rows ``start … end-1`` of a decoder's cache, as ``layers`` reads a decoder (views: writes
    go to the decoder's own cache)."""

    def __init__(self, dec: StaticDecoder, start: int, end: int):
        self.keys = [k[start:end] for k in dec.keys]
        self.values = [v[start:end] for v in dec.values]
        self.layers, self.norm, self.head, self.blocks = dec.layers, dec.norm, dec.head, dec.blocks
        self.cos, self.sin, self.head_dim, self.scale, self.gqa = dec.cos, dec.sin, dec.head_dim, dec.scale, dec.gqa
