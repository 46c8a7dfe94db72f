"""Packing: several short samples in one row of the batch, so that padding does not waste compute.

Samples are laid next to each other, in order, in rows of at most ``length`` tokens (a sample
that does not fit starts a new row). Each token carries its sample's segment number (1, 2, …; 0
for padding): the model attends only within a segment and restarts positions at each segment, so
a packed sample is computed exactly as it would be alone. The first token of every segment has no
label, as in an unpacked row, where nothing predicts it.
"""

from __future__ import annotations

import torch

from ..chat import IGNORE, Encoded


def pack_rows(encoded: list[Encoded], length: int) -> list[list[int]]:
    """Indices of ``encoded`` per row, in order."""
    rows: list[list[int]] = []
    used = length
    for i, e in enumerate(encoded):
        if used + len(e.input_ids) > length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += len(e.input_ids)
    return rows


def packed(encoded: list[Encoded], length: int, pad_id: int):
    """(ids, labels, mask, segments), each (R, T), for the samples packed into rows."""
    rows = pack_rows(encoded, length)
    width = max(sum(len(encoded[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, 1):
            e = encoded[i]
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(e.labels[1:])
            segments[r, at:at + n] = s
            at += n
    return ids, labels, (segments > 0).long(), segments


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its segment (padding: 0)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    start_of = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    return torch.where(segments > 0, index - start_of, torch.zeros_like(index))


def segment_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive attention mask: causal, within a segment (a padding query sees itself)."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    allowed = same & causal & (segments[:, None, :] > 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)  # no empty rows
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]
