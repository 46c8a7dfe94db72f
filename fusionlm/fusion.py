"""The two ways image features reach a decoder.

* Method A (``unified``, ``fuyu``): connector outputs replace the embeddings of the image-token
  positions; the decoder itself is unchanged (``scatter_image_features``).
* Method B (``cross_attention``): the sequence holds one marker token per image and no image
  features; gated cross-attention blocks (tanh gates starting at 0) run before every Nth decoder
  layer and let text queries attend to image keys/values (``GatedCrossAttentionBlock``). Image
  keys/values are projected once per request (``project_kv``) and passed back in at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SampleError

NO_IMAGE = torch.iinfo(torch.long).max  # marker index of a padding memory slot: never visible


def scatter_image_features(embeds: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Put image features, in order, into the image-token positions of the embedded sequence.

    Args:
        embeds: (B, T, D) token embeddings.
        image_mask: (B, T) bool, True at image-token positions (row-major order = image order).
        features: (I, N, D) connector outputs for the I images of the batch.
    """
    n_slots = int(image_mask.sum())
    if n_slots != features.shape[0] * features.shape[1]:
        raise SampleError(
            f"the batch has {n_slots} image-token positions but {features.shape[0]} images × "
            f"{features.shape[1]} tokens = {features.shape[0] * features.shape[1]} image features"
        )
    flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # (I*N, D)
    return embeds.masked_scatter(image_mask.unsqueeze(-1), flat)  # (B, T, D)


def normed(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` on x in its weight's dtype: under bf16 autocast an fp32 block normalises in fp32
    (torch's kernel refuses mixed dtypes), as Llama's own RMSNorm does."""
    return norm(x.to(norm.weight.dtype))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo-style block: x + tanh(a)·XAttn(x, image) then x + tanh(f)·FFN(x), gates at 0.

    With both gates at 0 the block is the identity, so a frozen LLM keeps its text behaviour
    exactly until the gates open.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, ffn_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.kv_norm = nn.RMSNorm(dim, eps=1e-6)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image memory (B, S, D) -> keys and values, each (B, Hkv, S, hd); once per request. They
        stay at the key/value heads' count (attention shares them among the query heads), so each
        decoding step reads H/Hkv times less image memory."""
        b, s, _ = memory.shape
        m = normed(self.kv_norm, memory)
        k = self.k_proj(m).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(m).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); visible (B, T, S) bool: which memory slots each text position may see."""
        b, t, d = x.shape
        k, v = kv
        q = self.q_proj(normed(self.attn_norm, x)).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        any_visible = visible.any(-1, keepdim=True)  # (B, T, 1): rows before the first image see nothing
        # A fully masked row would give NaN in softmax: let it see everything, then zero its output.
        mask = (visible | ~any_visible).unsqueeze(1)  # (B, 1, T, S)
        attn = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                              enable_gqa=self.num_heads != self.num_kv_heads)  # (B, H, T, hd)
        attn = self.o_proj(attn.transpose(1, 2).reshape(b, t, d)) * any_visible  # (B, T, D)
        x = x + torch.tanh(self.attn_gate) * attn
        x = x + torch.tanh(self.ffn_gate) * self.ffn(normed(self.ffn_norm, x)) * any_visible
        return x


@dataclass
class CrossInputs:
    """What Method B needs, computed once per request.

    Attributes:
        kv: per block (keyed by decoder-layer index) the projected image keys/values; empty when
            the LLM has cross-attention layers of its own (Llama 3.2 Vision), which get ``memory``.
        slot_marker: (B, S) sequence index of the marker of the image each memory slot belongs
            to (``NO_IMAGE`` for padding slots); a text position sees a slot only at or after it.
        slot_until: (B, S) the position from which that image is hidden again (``NO_IMAGE``:
            never), for the ``latest`` visibility rule.
        slot_valid: (B, S) False for slots no text may see (padding tiles of a tiled image).
        memory: (B, S, D) the image tokens themselves.
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    slot_marker: torch.Tensor
    slot_until: torch.Tensor
    slot_valid: torch.Tensor
    memory: torch.Tensor | None = None

    def for_call(self, num_queries: int, query_start: int = 0, segments: torch.Tensor | None = None) -> "CrossCall":
        """The inputs of one forward call over positions ``query_start … query_start+num_queries-1``.
        ``segments``: (B, T) packed rows (the whole sequence, ``data.batching.packing``): a position
        sees only the images whose markers are in its own sample."""
        q = (torch.arange(num_queries, device=self.slot_marker.device) + query_start)[None, :, None]  # (1, T, 1)
        visible = (self.slot_marker[:, None, :] <= q) & (q < self.slot_until[:, None, :])  # (B, T, S)
        if segments is None:
            return CrossCall(self.kv, visible & self.slot_valid[:, None, :])
        at = self.slot_marker.clamp(max=segments.shape[1] - 1)  # (B, S)
        slot_segment = segments.gather(1, at).masked_fill(self.slot_marker == NO_IMAGE, -1)  # (B, S); -1: padding
        own = slot_segment[:, None, :] == segments[:, :, None]  # (B, T, S)
        return CrossCall(self.kv, visible & own & self.slot_valid[:, None, :], own=own)


@dataclass
class CrossCall:
    """Handed to every block in one forward call: keys/values and the (B, T, S) visibility mask.
    ``own``: packed rows, (B, T, S) the slots of each position's own sample (visible or not).
    ``reached``: the decoder layers whose hook received it (checked after the call)."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    visible: torch.Tensor
    own: torch.Tensor | None = None
    reached: set[int] = field(default_factory=set)


@dataclass
class ImageContext:
    """Image information for one batch, computed once per request and reused at every step.

    ``features`` (I, N, D) is what Method A scatters into the prefill; ``cross`` is what
    Method B's blocks attend to (keys/values already projected).
    """

    features: torch.Tensor | None = None
    cross: CrossInputs | None = None


def cross_layer(blocks: nn.ModuleDict, index: int, hidden: torch.Tensor, call: CrossCall | None) -> torch.Tensor:
    """The cross-attention work before decoder layer ``index`` on ``hidden`` (B, T, D): its gated
    block, if it has one and the call carries images. Both decoding paths (transformers' forward
    through ``FusionLM``'s hooks, and ``runtime.StaticDecoder``) run it."""
    key = str(index)
    if call is None or key not in blocks:
        return hidden
    return blocks[key](hidden, call.kv[index], call.visible)  # (B, T, D)


def image_memory(features: torch.Tensor, marker_mask: torch.Tensor, *, visibility: str = "preceding",
                 valid: torch.Tensor | None = None, pad: torch.Tensor | None = None) -> CrossInputs:
    """Group the batch's images by row for cross-attention.

    Args:
        features: (I, N, D) connector outputs, images in row-major order of their markers.
        marker_mask: (B, T) bool, True at each image's marker token.
        visibility: ``preceding`` (a token sees every earlier image) or ``latest`` (only the most
            recent image, a run of adjacent markers counting as one: Flamingo, Llama 3.2 Vision).
        valid: (I, N) bool, False for tokens no text may see (padding tiles).
        pad: (N, D) what fills the slots of a row with fewer images (default zeros).
    Returns:
        ``CrossInputs`` without keys/values: memory (B, M*N, D) and the per-slot bookkeeping.
    """
    n_img, n_tok, dim = features.shape
    rows, cols = marker_mask.nonzero(as_tuple=True)  # each (I,), row-major
    if rows.numel() != n_img:
        raise SampleError(f"the batch has {rows.numel()} image markers but {n_img} images")
    b, t = marker_mask.shape
    counts = marker_mask.sum(1)  # (B,)
    m = int(counts.max()) if n_img else 0
    slot = torch.arange(n_img, device=features.device) - (counts.cumsum(0) - counts)[rows]  # (I,) index within row
    memory = features.new_zeros(b, m, n_tok, dim) if pad is None else pad.expand(b, m, n_tok, dim).clone()
    memory[rows, slot] = features  # (B, M, N, D)
    marker = torch.full((b, m), NO_IMAGE, dtype=torch.long, device=features.device)  # (B, M)
    marker[rows, slot] = cols
    until = torch.full((b, m), NO_IMAGE, dtype=torch.long, device=features.device)  # (B, M)
    if visibility == "latest":
        for r in range(b):
            pos = cols[rows == r].tolist()
            end = NO_IMAGE  # the last image (and the run of markers before it) stays visible
            for j in range(len(pos) - 1, -1, -1):
                if j + 1 < len(pos) and pos[j + 1] != pos[j] + 1:
                    end = pos[j + 1]  # hidden from the next (non-adjacent) image's marker on
                until[r, j] = end
    ok = torch.zeros(b, m, n_tok, dtype=torch.bool, device=features.device)  # (B, M, N)
    ok[rows, slot] = True if valid is None else valid
    return CrossInputs(
        kv={}, slot_marker=marker.repeat_interleave(n_tok, dim=1), slot_until=until.repeat_interleave(n_tok, dim=1),
        slot_valid=ok.reshape(b, m * n_tok), memory=memory.reshape(b, m * n_tok, dim),
    )


def native_cross_inputs(call: CrossCall, memory: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Llama 3.2 Vision's own cross-attention keyword arguments for one call: the additive mask
    (B, 1, T, S) from its (B, T, S) visibility, the row mask (B, 1, T, 1) and the image memory
    (B, S, D) (None: the KV cache holds its keys/values, and it is not passed).

    As in transformers' Mllama, a text row that sees no image attends to every slot (gated; only
    its cross-attention MLP output is zeroed, by the row mask). Packed rows (``call.own``): to every
    slot of its own sample; and a sample without images, which alone would skip the cross-attention
    layers, to one more slot of zeros appended to the memory (its keys and values are zero, so is
    the output): S is then the memory's slots + 1.
    """
    visible = call.visible
    seen = visible.any(-1, keepdim=True)  # (B, T, 1)
    if call.own is None:
        allowed = visible | ~seen  # (B, T, S)
    else:
        allowed = torch.where(seen, visible, call.own)  # (B, T, S)
        allowed = torch.cat([allowed, ~allowed.any(-1, keepdim=True)], dim=-1)  # (B, T, S+1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=visible.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, T, S)
    out = {"cross_attention_mask": mask, "full_text_row_masked_out_mask": seen[:, None].to(dtype)}
    if memory is not None:
        memory = memory.to(dtype)  # (B, S, D)
        if call.own is not None:
            memory = torch.cat([memory, memory.new_zeros(memory.shape[0], 1, memory.shape[2])], dim=1)  # (B, S+1, D)
        out["cross_attention_states"] = memory
    return out
