"""Packing: several short samples in one row of the batch, so that padding does not waste compute.

A micro-batch's samples go into rows of ``width`` tokens, first fit by decreasing length: each
sample, longest first, into the first row with room. Each token carries its sample's segment number (1, 2, …; 0
for padding): the model attends only within a segment (to text and, for Method B, to images) and
restarts positions at each segment, so a packed sample is computed exactly as it would be alone.
The first token of every segment has no label, as in an unpacked row, where nothing predicts it.

The width is chosen per micro-batch (``Packing.width``): the longest sample rounded up to ``ROUND``,
or twice, four times … that, up to the LLM's ``max_length``, whichever costs least. A row costs its
positions (every matrix product runs on padding too) and its attention, which under a block mask
still computes all T² scores: per layer about 24·D² FLOPs per position for the products and 4·D·T
for attention, so a row of T positions costs T·(1 + T/(6·D)) position-products. Wide rows leave
less padding; narrow rows attend less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..chat import IGNORE, Encoded

ROUND = 32  # row widths are multiples of this: fewer distinct shapes (compiled layers build one graph per shape)


@dataclass(frozen=True)
class Packing:
    """How a model's batches are packed: rows of at most ``max_length`` (the LLM's), for an LLM
    ``hidden_size`` wide (what attention costs next to the matrix products)."""

    max_length: int
    hidden_size: int

    def width(self, lengths: list[int]) -> int:
        """The width of the packed rows of samples of ``lengths`` tokens: the cheapest candidate."""
        return self.cheapest(lengths)[0]

    def cheapest(self, lengths: list[int]) -> tuple[int, list[list[int]]]:
        """The cheapest width for samples of ``lengths`` tokens and their rows at it (``pack_rows``)."""
        return min(((w, pack_rows(lengths, w)) for w in self.candidates(lengths)),
                   key=lambda c: (self.cost(len(c[1]), c[0]), c[0]))

    def candidates(self, lengths: list[int]) -> list[int]:
        """The widths tried: the longest sample rounded up to ``ROUND``, then doubled up to ``max_length``."""
        longest = max(lengths)
        widths = [max(longest, min(self.max_length, -(-longest // ROUND) * ROUND))]
        while widths[-1] < self.max_length and len(widths) < 8:
            widths.append(min(self.max_length, 2 * widths[-1]))
        return widths

    def cost(self, rows: int, width: int) -> float:
        """What ``rows`` rows of ``width`` positions cost, in position-products (module docstring)."""
        return rows * width * (1 + width / (6 * self.hidden_size))


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of the samples of ``lengths`` per row of ``width`` tokens: first fit, longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def packed(encoded: list[Encoded], pack: Packing, pad_id: int):
    """(ids, labels, mask, segments), each (R, T), for the samples packed into rows at ``pack``'s
    cheapest width, and the samples' order in them (row by row)."""
    _, rows = pack.cheapest([len(e.input_ids) for e in encoded])
    t = max(sum(len(encoded[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    segments = torch.zeros((len(rows), t), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, 1):
            e = encoded[i]
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(e.labels[1:])
            segments[r, at:at + n] = s
            at += n
    return ids, labels, (segments > 0).long(), segments, [i for row in rows for i in row]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its segment (padding: 0)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    start_of = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    return torch.where(segments > 0, index - start_of, torch.zeros_like(index))


def segment_mask(segments: torch.Tensor, dtype: torch.dtype, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, T) additive attention mask: causal, within a segment (a padding query sees itself).

    ``blocks`` (B, T): positions of one nonzero block number see each other both ways (a masked
    generator's image: every position of it sees every other); 0: causal only."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    if blocks is not None:
        causal = causal | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, None, :] > 0))  # (B, T, T)
    allowed = same & causal & (segments[:, None, :] > 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)  # no empty rows
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]
