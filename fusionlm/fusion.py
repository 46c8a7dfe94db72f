"""The two ways image features reach a decoder.

* Method A (``unified``, ``fuyu``): connector outputs replace the embeddings of the image-token
  positions; the decoder itself is unchanged (``scatter_image_features``).
* Method B (``cross_attention``): the sequence holds one marker token per image and no image
  features; gated cross-attention blocks (tanh gates starting at 0) run before every Nth decoder
  layer and let text queries attend to image keys/values (``GatedCrossAttentionBlock``). Image
  keys/values are projected once per request (``project_kv``) and passed back in at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo-style block: x + tanh(a)·XAttn(x, image) then x + tanh(f)·FFN(x), gates at 0.

    With both gates at 0 the block is the identity, so a frozen LLM keeps its text behaviour
    exactly until the gates open.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, ffn_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.attn_norm = RMSNorm(dim)
        self.kv_norm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image memory (B, S, D) -> keys and values, each (B, H, S, hd); once per request."""
        b, s, _ = memory.shape
        m = self.kv_norm(memory)
        k = self.k_proj(m).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(m).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        rep = self.num_heads // self.num_kv_heads
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); visible (B, T, S) bool: which memory slots each text position may see."""
        b, t, d = x.shape
        k, v = kv
        q = self.q_proj(self.attn_norm(x)).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        any_visible = visible.any(-1, keepdim=True)  # (B, T, 1): rows before the first image see nothing
        # A fully masked row would give NaN in softmax: let it see everything, then zero its output.
        mask = (visible | ~any_visible).unsqueeze(1)  # (B, 1, T, S)
        attn = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)  # (B, H, T, hd)
        attn = self.o_proj(attn.transpose(1, 2).reshape(b, t, d)) * any_visible  # (B, T, D)
        x = x + torch.tanh(self.attn_gate) * attn
        x = x + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(x)) * any_visible
        return x


@dataclass
class CrossInputs:
    """What Method B's blocks need, computed once per request.

    Attributes:
        kv: per block (keyed by decoder-layer index) the projected image keys/values.
        slot_marker: (B, S) sequence index of the marker of the image each memory slot belongs
            to (``NO_IMAGE`` for padding slots); a text position sees a slot iff its own index is
            at or after that marker (Flamingo's per-image causal masking).
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    slot_marker: torch.Tensor

    def for_call(self, num_queries: int, query_start: int = 0) -> "CrossCall":
        """The inputs of one forward call over positions ``query_start … query_start+num_queries-1``."""
        q_index = torch.arange(num_queries, device=self.slot_marker.device) + query_start  # (T,)
        visible = self.slot_marker[:, None, :] <= q_index[None, :, None]  # (B, T, S)
        return CrossCall(self.kv, visible)


@dataclass
class CrossCall:
    """Handed to every block in one forward call: keys/values and the (B, T, S) visibility mask."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    visible: torch.Tensor


def image_memory(features: torch.Tensor, marker_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the batch's images by row for cross-attention.

    Args:
        features: (I, N, D) connector outputs, images in row-major order of their markers.
        marker_mask: (B, T) bool, True at each image's marker token.
    Returns:
        memory (B, M*N, D) zero-padded, and slot_marker (B, M*N) as in ``CrossInputs``.
    """
    n_img, n_tok, dim = features.shape
    rows, cols = marker_mask.nonzero(as_tuple=True)  # each (I,), row-major
    if rows.numel() != n_img:
        raise SampleError(f"the batch has {rows.numel()} image markers but {n_img} images")
    b = marker_mask.shape[0]
    counts = marker_mask.sum(1)  # (B,)
    m = int(counts.max()) if n_img else 0
    slot = torch.arange(n_img, device=features.device) - (counts.cumsum(0) - counts)[rows]  # (I,) index within row
    memory = features.new_zeros(b, m, n_tok, dim)  # (B, M, N, D)
    memory[rows, slot] = features
    marker = torch.full((b, m), NO_IMAGE, dtype=torch.long, device=features.device)  # (B, M)
    marker[rows, slot] = cols
    return memory.reshape(b, m * n_tok, dim), marker.repeat_interleave(n_tok, dim=1)  # (B, M*N, D), (B, M*N)
