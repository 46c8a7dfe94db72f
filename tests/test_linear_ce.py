"""fusionlm.linear_ce: the chunked linear + cross-entropy equals the reference
``F.cross_entropy(F.linear(h, W, b).float(), t)`` in its loss and every gradient, and never holds
an (N, V) tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fusionlm.linear_ce import default_chunk_rows, linear_cross_entropy

N, D, V = 23, 16, 37
TOL = dict(rtol=1e-6, atol=1e-6)


def inputs(n=N, d=D, v=V, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()  # (N, D)
    w = (torch.randn(v, d, generator=g, dtype=dtype) / math.sqrt(d)).requires_grad_()  # (V, D)
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.5).requires_grad_() if bias else None  # (V,)
    t = torch.randint(0, v, (n,), generator=g)  # (N,)
    return h, w, b, t


def reference(h, w, b, t, reduction):
    return F.cross_entropy(F.linear(h, w, b).float(), t, reduction=reduction)


def loss_and_grads(fn, h, w, b, t, **kw):
    for x in (h, w, b):
        if x is not None and x.is_leaf:
            x.grad = None
    loss = fn(h, w, b, t, **kw)
    loss.backward()
    grads = [None if x is None or not x.is_leaf or x.grad is None else x.grad.clone() for x in (h, w, b)]
    return loss.detach(), grads


def assert_matches(h, w, b, t, reduction, tol=TOL, **kw):
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, reduction=reduction)
    loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, reduction=reduction, **kw)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for name, got, want in zip("hwb", grads, ref_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.dtype == want.dtype, name
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 5, 23, 100, None])  # 5 does not divide 23; 100 > N
def test_equals_reference(reduction, bias, chunk_rows):
    assert_matches(*inputs(bias=bias), reduction, chunk_rows=chunk_rows)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dividing_chunks(reduction):
    h, w, b, t = inputs(n=24)
    for rows in (4, 6, 8, 12):
        assert_matches(h, w, b, t, reduction, chunk_rows=rows)


def test_wrong_scale_is_caught():
    # the comparison is strict enough to see a gradient that is off by a little (not only a bug's worth)
    h, w, b, t = inputs()
    _, ref = loss_and_grads(reference, h, w, b, t, reduction="mean")
    _, ours = loss_and_grads(linear_cross_entropy, h, w, b, t, reduction="mean", chunk_rows=5)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours[1] * (1 + 1e-4), ref[1], **TOL)


def test_frozen_weight_computes_no_weight_gradient(monkeypatch):
    h, w, b, t = inputs()
    w.requires_grad_(False)
    products = []
    real_addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: products.append(self.shape) or
                        real_addmm(self, *a, **k))
    assert_matches(h, w, b, t, "mean", chunk_rows=5)
    assert w.grad is None and not products  # no weight-gradient accumulation ran
    b.requires_grad_(False)
    assert_matches(h, w, b, t, "sum", chunk_rows=5)
    assert b.grad is None
    w.requires_grad_(True)
    assert_matches(h, w, b, t, "sum", chunk_rows=5)
    assert products == [w.shape] * 5  # and the check above could see one


def test_scaled_and_summed_losses():
    # the backward scales by the incoming gradient: a weighted sum of two losses
    h, w, b, t = inputs()
    ref_loss, ref_grads = loss_and_grads(lambda *a: 2.5 * reference(*a, "mean") - reference(*a, "sum") / 7,
                                         h, w, b, t)
    loss, grads = loss_and_grads(lambda *a: 2.5 * linear_cross_entropy(*a, chunk_rows=4)
                                 - linear_cross_entropy(*a, reduction="sum", chunk_rows=9) / 7, h, w, b, t)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_retained_graph_backward_twice():
    # a second backward of a retained graph must find the stored gradients intact, whether they
    # were handed on uncopied (grad_output 1) or scaled; the weight is also an embedding's here
    h, w, b, t = inputs()
    heads = {"reference": lambda: reference(h, w, b, t, "mean"),
             "chunked": lambda: linear_cross_entropy(h, w, b, t, chunk_rows=5)}
    for scale in (1.0, 3.0):
        got = {}
        for name, head in heads.items():
            h.grad = w.grad = b.grad = None
            loss = scale * head() + F.embedding(t, w).square().sum()
            loss.backward(retain_graph=True)
            once = [x.grad.clone() for x in (h, w, b)]
            loss.backward()
            got[name] = once + [x.grad.clone() for x in (h, w, b)]
        for ours, ref in zip(got["chunked"], got["reference"]):
            torch.testing.assert_close(ours, ref, **TOL)
        for first, second in zip(got["chunked"][:3], got["chunked"][3:]):
            torch.testing.assert_close(second, 2 * first, **TOL)


def test_frozen_hidden_and_no_grad():
    h, w, b, t = inputs()
    h.requires_grad_(False)
    assert_matches(h, w, b, t, "mean", chunk_rows=7)
    assert h.grad is None
    with torch.no_grad(), Sizes() as calls:
        loss = linear_cross_entropy(h, w, b, t, chunk_rows=7)
    assert not loss.requires_grad
    assert "log_softmax" in calls.names and not {"exp_", "mm", "matmul", "addmm_"} & set(calls.names)  # no gradients
    torch.testing.assert_close(loss, reference(h, w, b, t, "mean").detach(), **TOL)


def test_tied_weight_with_embedding():
    # the head's weight is also the input embedding: the weight gradient sums both uses
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(V, D, generator=g) / 4).requires_grad_()  # (V, D)
    ids = torch.randint(0, V, (2, 13), generator=g)  # (B, T)
    mix = torch.randn(D, D, generator=g) / 4

    def run(head):
        w.grad = None
        hidden = torch.tanh(F.embedding(ids, w) @ mix)  # (B, T, D)
        at = torch.ones_like(ids[:, 1:], dtype=torch.bool)
        at[0, :4] = False
        rows = hidden[:, :-1][at]  # (N, D), a gather of a non-contiguous slice
        loss = head(rows, w, None, ids[:, 1:][at])
        loss.backward()
        return loss.detach(), w.grad.clone()

    ref_loss, ref_grad = run(lambda h, w, b, t: reference(h, w, b, t, "sum"))
    loss, grad = run(lambda h, w, b, t: linear_cross_entropy(h, w, b, t, reduction="sum", chunk_rows=4))
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    _, head_only = run(lambda h, w, b, t: linear_cross_entropy(h.detach(), w, b, t, reduction="sum", chunk_rows=4))
    assert not torch.allclose(head_only, grad)  # the embedding's share is in there


def test_non_contiguous_hidden():
    h, w, b, t = inputs(n=2 * N)
    view = h.t().contiguous().t()[::2]  # (N, D), column-major and strided
    assert not view.is_contiguous()
    ref_loss, ref_grads = loss_and_grads(reference, view, w, b, t[::2], reduction="mean")
    ref_h, h.grad = h.grad.clone(), None
    loss, grads = loss_and_grads(linear_cross_entropy, view, w, b, t[::2], reduction="mean", chunk_rows=6)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(h.grad, ref_h, **TOL)
    torch.testing.assert_close(grads[1], ref_grads[1], **TOL)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_no_rows(reduction):
    h, w, b, t = inputs(n=0)
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, reduction=reduction)
    loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, reduction=reduction)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    assert (loss.isnan() if reduction == "mean" else loss == 0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
        assert got.shape == want.shape and not got.any()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bf16_autocast_close_to_reference(reduction):
    h, w, b, t = inputs(n=40, d=64, v=300)
    kept = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, reduction=reduction)
        with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append(x.dtype) or x, lambda x: x):
            loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, reduction=reduction, chunk_rows=7)
    assert loss.dtype == torch.float32
    assert kept == [torch.float32] * 3  # the gradients are kept in the inputs' dtype, not autocast's
    with torch.no_grad():
        exact = reference(h, w, b, t, reduction)  # fp32: what bf16 logits move away from
    assert (ref_loss - exact).abs() > 1e-5  # the reference did run in bf16 ...
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=2e-3)  # ... and so did we
    assert (loss - ref_loss).abs() < (exact - ref_loss).abs() * 0.5 + 1e-4
    for name, got, want in zip("hwb", grads, ref_grads):
        assert got.dtype == torch.float32, name  # the inputs' dtype, not bf16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item(), msg=name)


def test_bf16_inputs_give_bf16_grads():
    h, w, b, t = inputs(n=40, d=64, v=300, dtype=torch.bfloat16)
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, reduction="mean")
    loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, reduction="mean", chunk_rows=9)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


class Sizes(TorchFunctionMode):
    """The element counts of every tensor the torch functions called under it return."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(getattr(func, "__name__", str(func)))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.numels.append(x.numel())
        return out


def largest(fn, h, w, b, t):
    """(largest tensor made in the forward, largest tensor saved for the backward, largest gradient)."""
    made, saved = Sizes(), []

    def pack(x):
        saved.append(x.numel())
        return x

    with made, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(h, w, b, t)
    loss.backward()
    return max(made.numels), max(saved), max(x.grad.numel() for x in (h, w, b))


def test_never_holds_n_by_v():
    n, v = 64, 300
    h, w, b, t = inputs(n=n, d=8, v=v)
    # the probe sees the reference's (N, V) logits, made and saved for the backward
    ref_made, ref_saved, _ = largest(lambda *a: reference(*a, "mean"), h, w, b, t)
    assert ref_made >= n * v and ref_saved >= n * v
    chunk = 10
    made, saved, grad = largest(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk), h, w, b, t)
    assert made == chunk * v  # a chunk's logits are the largest thing made
    assert saved == grad == v * 8  # only the gradients are kept: the (V, D) weight's is the largest
    assert saved < n * v


def test_default_chunk_rows():
    assert default_chunk_rows(49_152) == 170  # 2**23 // 49,152: 32 MiB of fp32 logits
    assert default_chunk_rows(400) == 2**23 // 400
    assert default_chunk_rows(10**9) == 1


def test_bad_arguments():
    h, w, b, t = inputs()
    for kw in (dict(reduction="none"), dict(chunk_rows=0)):
        with pytest.raises(ValueError):
            linear_cross_entropy(h, w, b, t, **kw)
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, b, t[:-1])
