"""Chunked linear + cross-entropy ("fused linear cross-entropy"), in plain torch.

``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` makes the (N, V) logits, an
fp32 copy of them and their log-softmax, and keeps (N, V) tensors alive until the backward: with a
real vocabulary (V = 49,152) they outweigh everything else the head does. ``linear_cross_entropy``
gives the same loss and gradients without ever holding the whole (N, V): the forward walks the rows
in chunks, and for each chunk makes its logits, its loss and at once its gradient w.r.t. the logits
(softmax - one-hot, over N for a mean), turns that into the chunk's gradients w.r.t. its hidden
rows, the weight and the bias, and drops the chunk's logits. The backward only scales the stored
gradients by the incoming (scalar) gradient, in place. This is the idea of Liger-Kernel's
FusedLinearCrossEntropy and Apple's cut-cross-entropy, without their fused kernels.

Memory: O(chunk x V) in place of O(N x V). A chunk's transients are its fp32 logits and their
log-softmax (turned into the softmax gradient in place), at most two (chunk, V) fp32 buffers at once
(plus a compute-dtype copy under autocast), freed before the next chunk; the reference keeps (N, V)
ones from the forward to the backward. What is kept is the gradients themselves: (N, D) for the
hidden rows and (V, D) + (V,) for the head (the same the reference's backward makes), each only
where that input requires a gradient, so a frozen head pays for no weight gradient and a forward
under ``torch.no_grad`` for none at all.

Precision follows the reference: each chunk's logits are computed by ``F.linear`` in the dtype the
reference's ``F.linear`` would use (the autocast dtype under autocast, else the inputs'), then
made fp32 for the softmax; the gradient matmuls run in that same dtype, the weight gradient is
accumulated over the chunks in fp32 (fp64 for fp64 inputs), and every gradient comes back in its
input's dtype.

Autocast: ``torch.amp.custom_fwd`` without ``cast_inputs`` only records the autocast state for
``custom_bwd``, which replays it around the backward; our backward is a scalar multiply that
autocast does not touch, so neither decorator would change anything, and both need one fixed
``device_type`` where fusionlm trains on CPU or CUDA. ``cast_inputs`` would impose one dtype
whatever the caller's autocast asks for. So the forward reads the dtype the caller's autocast gives
``F.linear`` (on the inputs' own device), casts the head once, and runs the chunks with autocast
off, the casts explicit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**23  # a chunk's fp32 logits: 32 MiB; see default_chunk_rows


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: 2**23 logits (32 MiB in fp32, 170 rows at V = 49,152, all of N at V = 400).
    Each chunk streams the whole (V, D) head twice and the fp32 (V, D) weight-gradient accumulator
    once, for ~2 x rows FLOPs per element: with few rows the matmuls are memory-bound and inefficient
    (on 2 CPU cores ``F.linear`` of 42 rows x 576 x 49,152 ran at ~34 GFLOP/s, 170 rows at ~60,
    682-2,048 at ~75-79, and 42-row chunks were the slowest in every ``--sweep`` of
    benchmarks/linear_ce.py); with many, the two (rows, V) fp32 buffers grow past the (V, D)
    weight gradient (113 MB at 49,152 x 576) that any training step holds anyway."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, reduction: str, chunk_rows: int, grads: bool):
        n, _ = hidden.shape  # (N, D)
        vocab = weight.shape[0]  # weight (V, D), bias (V,) or None, targets (N,)
        want_h, want_w, want_b = (grads and ctx.needs_input_grad[i] for i in range(3))
        want_b = want_b and bias is not None
        device = hidden.device.type
        # the dtype the reference's F.linear computes in (autocast's, or the inputs'): probed on no rows
        compute = F.linear(hidden[:0], weight[:1]).dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(compute)  # (V, D), cast once rather than per chunk
            b = None if bias is None else bias.to(compute)  # (V,)
            grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if want_h else None  # (N, D)
            acc = torch.promote_types(compute, torch.float32)  # the head's gradients sum in fp32 (fp64 kept)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None  # (V, D)
            grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if want_b else None  # (V,)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
            for start in range(0, n, chunk_rows):
                h = hidden[start:start + chunk_rows].to(compute)  # (n, D)
                t = targets[start:start + chunk_rows]  # (n,)
                logits = F.linear(h, w, b).float()  # (n, V) fp32
                logp = torch.log_softmax(logits, dim=-1)  # (n, V), one pass (logsumexp takes several)
                del logits
                total -= logp.gather(1, t[:, None]).sum()
                if not (want_h or want_w or want_b):
                    continue
                g = logp.exp_()  # (n, V) softmax, in place
                g.scatter_add_(1, t[:, None], g.new_full((len(t), 1), -1.0))  # softmax - one-hot
                if want_b:
                    grad_b += g.sum(0)  # (V,), fp32 like g
                g = g.to(compute)  # (n, V), no copy in fp32
                if want_h and grad_h.dtype == compute:
                    torch.mm(g, w, out=grad_h[start:start + chunk_rows])  # (n, D), written in place
                elif want_h:
                    grad_h[start:start + chunk_rows] = g @ w  # (n, D) in the compute dtype, then cast
                if want_w and compute == acc:
                    grad_w.addmm_(g.t(), h, alpha=scale)  # (V, D) += (V, n) @ (n, D)
                elif want_w:
                    grad_w.add_(g.t() @ h, alpha=scale)  # (V, D), the chunk's product in the compute dtype
            if scale != 1.0:  # a mean's 1/N, on the (N, D) and (V,) gradients rather than each (n, V)
                for grad in (grad_h, grad_b):
                    if grad is not None:
                        grad.mul_(scale)
        loss = total / n if reduction == "mean" else total  # N == 0: nan for a mean, as F.cross_entropy
        saved = [x.to(dtype) if x is not None else None
                 for x, dtype in ((grad_h, hidden.dtype), (grad_w, weight.dtype),
                                  (grad_b, None if bias is None else bias.dtype))]
        ctx.present = [x is not None for x in saved]
        ctx.scale = None  # the stored gradients are unscaled (see backward)
        ctx.save_for_backward(*[x for x in saved if x is not None])
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # The stored gradients are scaled by the incoming (scalar) gradient in place, not copied: a
        # copy is a fresh (V, D) tensor each step (113 MB at 49,152 x 576), which cost a tenth of a
        # training step here. ``ctx.scale`` is what they are scaled by now, so that a retained
        # graph's next backward rescales them to its own gradient. ``.data``: these buffers are this
        # function's alone, and scaling them is not a change autograd's version check should see.
        scale = ctx.scale if ctx.scale is not None else torch.ones_like(grad_output)
        stored = list(ctx.saved_tensors)
        if not torch.equal(grad_output, scale):
            for x in stored:
                x.data.mul_(grad_output / scale)
            ctx.scale = grad_output.detach().clone()
        grads, stored = [], iter(stored)
        for present in ctx.present:
            grads.append(next(stored) if present else None)
        return (*grads, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, *, reduction: str = "mean",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction=reduction)``
    without the (N, V) logits: hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int64,
    every one a valid class (no ignore index: filter the rows first). ``reduction``: "sum" or
    "mean" (over N; N == 0 gives 0 for a sum and nan for a mean, as F.cross_entropy).
    ``chunk_rows``: rows per chunk, ``default_chunk_rows(V)`` by default. A scalar fp32 tensor."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets (N,) = ({hidden.shape[0]},) expected, got {tuple(targets.shape)}")
    rows = default_chunk_rows(weight.shape[0]) if chunk_rows is None else int(chunk_rows)
    if rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, reduction, rows, torch.is_grad_enabled())
