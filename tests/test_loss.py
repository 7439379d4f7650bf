"""lm_loss: chunked == plain (values and gradients), dtypes, ignore_index, and memory."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2fit.errors import UserError
from gpt2fit.train.loss import _ChunkedLinearCrossEntropy, lm_loss


def _inputs(B, T, C, V, dtype, seed=0, n_ignored=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, C, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    if n_ignored:
        flat = targets.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    return hidden, weight, targets


def _loss_and_grads(hidden, weight, targets, scale=1.0, **kw):
    loss = lm_loss(hidden, weight, targets, **kw)
    gh, gw = torch.autograd.grad(loss * scale, (hidden, weight))
    return loss, gh, gw


def _reference(hidden, weight, targets, scale=1.0):
    """Independent float64 reference: full logits, per-row log-softmax, manual masking."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp = torch.log_softmax(h.reshape(-1, h.shape[-1]) @ w.t(), dim=-1)
    t = targets.reshape(-1)
    keep = t != -100
    loss = -logp[keep].gather(1, t[keep].unsqueeze(1)).sum()
    gh, gw = torch.autograd.grad(loss * scale, (h, w))
    return loss, gh, gw


# (B, T, C, V, chunk): partial last chunk, chunk of 1, chunk larger than all rows, exact multiple.
SHAPES = [(3, 37, 16, 101, 25), (2, 5, 8, 13, 1), (1, 9, 12, 50, 1000), (4, 8, 32, 257, 8), (2, 33, 24, 300, 7)]


@pytest.mark.parametrize("B,T,C,V,chunk", SHAPES)
@pytest.mark.parametrize("n_ignored", [0, 5])
def test_chunked_matches_plain_float64(B, T, C, V, chunk, n_ignored):
    n_ignored = min(n_ignored, B * T - 1)
    h, w, t = _inputs(B, T, C, V, torch.float64, seed=B * T + V, n_ignored=n_ignored)
    ref = _reference(h, w, t, scale=0.37)
    plain = _loss_and_grads(h, w, t, scale=0.37)
    chunked = _loss_and_grads(h, w, t, scale=0.37, chunk_size=chunk)
    for got in (plain, chunked):
        assert got[0].dtype == torch.float64
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("B,T,C,V,chunk", SHAPES[:3])
def test_chunked_matches_plain_float32(B, T, C, V, chunk):
    h, w, t = _inputs(B, T, C, V, torch.float32, n_ignored=3)
    lp, ghp, gwp = _loss_and_grads(h, w, t, scale=1 / (B * T))
    lc, ghc, gwc = _loss_and_grads(h, w, t, scale=1 / (B * T), chunk_size=chunk)
    assert lc.dtype == torch.float32 and ghc.dtype == torch.float32 and gwc.dtype == torch.float32
    torch.testing.assert_close(lc, lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ghc, ghp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gwc, gwp, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_close_to_float32_reference_and_keep_dtypes():
    h, w, t = _inputs(2, 40, 32, 211, torch.bfloat16, n_ignored=4)
    ref = _reference(h, w, t)  # float64 math on the same bf16 values
    for kw in ({}, {"chunk_size": 16}):
        loss, gh, gw = _loss_and_grads(h, w, t, **kw)
        assert loss.dtype == torch.float32
        assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
        torch.testing.assert_close(loss.double(), ref[0], rtol=2e-2, atol=0.0)
        for got, want in ((gh, ref[1]), (gw, ref[2])):
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < 3e-2, err


def test_chunked_under_autocast_matches_plain_under_autocast():
    h, w, t = _inputs(2, 30, 32, 150, torch.float32, n_ignored=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = lm_loss(h, w, t)
        lc = lm_loss(h, w, t, chunk_size=11)
    assert lp.dtype == lc.dtype == torch.float32
    ghp, gwp = torch.autograd.grad(lp, (h, w))
    ghc, gwc = torch.autograd.grad(lc, (h, w))
    assert ghc.dtype == torch.float32 and gwc.dtype == torch.float32  # grads in the input dtypes
    torch.testing.assert_close(lc, lp, rtol=1e-3, atol=0.0)  # same bf16 matmul, fp32 softmax
    for got, want in ((ghc, ghp), (gwc, gwp)):
        assert (got - want).abs().max() / want.abs().max() < 2e-2
    # and both are close to the exact float64 answer
    ref = _reference(h, w, t)
    torch.testing.assert_close(lc.double(), ref[0], rtol=2e-2, atol=0.0)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_only_one_input_requires_grad(which):
    h, w, t = _inputs(2, 9, 8, 31, torch.float64, n_ignored=2)
    ref = _reference(h, w, t)
    if which == "hidden":
        w = w.detach()
        (g,) = torch.autograd.grad(lm_loss(h, w, t, chunk_size=4), (h,))
        torch.testing.assert_close(g, ref[1])
    else:
        h = h.detach()
        (g,) = torch.autograd.grad(lm_loss(h, w, t, chunk_size=4), (w,))
        torch.testing.assert_close(g, ref[2])


def test_nothing_requires_grad_and_no_grad_mode():
    h, w, t = _inputs(2, 9, 8, 31, torch.float64)
    ref = _reference(h, w, t)[0]
    out = lm_loss(h.detach(), w.detach(), t, chunk_size=4)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        out = lm_loss(h, w, t, chunk_size=4)
    assert out.grad_fn is None
    torch.testing.assert_close(out, ref)


def test_all_targets_ignored_gives_zero_loss_and_zero_grads():
    h, w, t = _inputs(2, 6, 8, 17, torch.float64)
    t = torch.full_like(t, -100)
    for kw in ({}, {"chunk_size": 5}):
        loss, gh, gw = _loss_and_grads(h, w, t, **kw)
        assert loss.item() == 0.0
        assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_custom_ignore_index_and_flat_inputs():
    h, w, t = _inputs(1, 12, 8, 19, torch.float64)
    h2, t1 = h.reshape(12, 8), t.reshape(12).clone()
    t1[:3] = 7  # ignore_index=7 drops these rows (and any other 7s)
    keep = t1 != 7
    want = torch.nn.functional.cross_entropy(h2[keep] @ w.t(), t1[keep], reduction="sum")
    for kw in ({}, {"chunk_size": 5}):
        got = lm_loss(h2, w, t1, ignore_index=7, **kw)
        torch.testing.assert_close(got, want)


def test_backward_twice_with_retain_graph_is_consistent():
    h, w, t = _inputs(2, 9, 8, 31, torch.float64)
    loss = lm_loss(h, w, t, chunk_size=4)
    g1 = torch.autograd.grad(loss * 2.0, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss * 2.0, (h, w))
    torch.testing.assert_close(g1[0], g2[0])
    torch.testing.assert_close(g1[1], g2[1])


def test_loss_is_a_sum_not_a_mean():
    h, w, t = _inputs(2, 10, 8, 23, torch.float64)
    one = lm_loss(h[:1], w, t[:1], chunk_size=3) + lm_loss(h[1:], w, t[1:], chunk_size=3)
    torch.testing.assert_close(lm_loss(h, w, t, chunk_size=3), one)


# --- memory: the point of the chunked path -------------------------------------------------


class _MaxNumel(TorchDispatchMode):
    """Largest tensor any aten op produces while active (forward and, on CPU, backward too)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.max_numel = max(self.max_numel, x.numel())
        return out


def _saved_numels(fn):
    numels = []

    def pack(x):
        numels.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, numels


B, T, C, V, CHUNK = 4, 64, 16, 1000, 32  # B*T*V = 256,000 >> max(CHUNK*V, V*C, B*T*C) = 32,000


def test_chunked_never_materializes_full_logits():
    h, w, t = _inputs(B, T, C, V, torch.float32)
    full = B * T * V
    bound = max(CHUNK * V, V * C, B * T * C)
    assert full >= 8 * bound
    for kw, must_be_small in (({}, False), ({"chunk_size": CHUNK}, True)):
        mode = _MaxNumel()
        with mode:
            loss = lm_loss(h, w, t, **kw)
            torch.autograd.grad(loss / (B * T), (h, w))
        if must_be_small:
            assert mode.max_numel <= bound, (kw, mode.max_numel)
        else:  # the detector works: the plain path does build [B*T, V]
            assert mode.max_numel >= full, (kw, mode.max_numel)


def test_chunked_saves_only_gradients_for_backward():
    h, w, t = _inputs(B, T, C, V, torch.float32)
    _, plain_saved = _saved_numels(lambda: lm_loss(h, w, t))
    assert max(plain_saved) >= B * T * V  # log-softmax output kept for backward
    loss, chunked_saved = _saved_numels(lambda: lm_loss(h, w, t, chunk_size=CHUNK))
    assert sorted(chunked_saved) == sorted([B * T * C, V * C])  # grad_hidden and grad_weight only
    assert isinstance(loss.grad_fn, _ChunkedLinearCrossEntropy._backward_cls)
    assert all(x.numel() < B * T * V for x in loss.grad_fn.saved_tensors)


# --- errors ---------------------------------------------------------------------------------


def test_bad_options_raise_user_errors():
    h, w, t = _inputs(1, 4, 8, 11, torch.float32)
    with pytest.raises(UserError, match="chunk_size"):
        lm_loss(h, w, t, chunk_size=-1)
    with pytest.raises(ValueError, match="targets shape"):
        lm_loss(h, w, t[:, :2])
