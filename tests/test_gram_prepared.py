"""The Gram path's fused launches (Triton). ``gram_prepare`` writes the pixels' inverse norms
and [E; D] rounded as the loss kernel's products take them, in one launch; the loss kernel
reading them gives what it gives forming the same operands in registers, bit for bit; the op
takes this path at "tf32" and "ieee" and still meets the float64 reference. The backward's
products with the norm backward in their epilogue (``gram_grad_features``) give what the
two launches give."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, NO_TRITON
from test_affinity import GRAD_RTOL, LOSS_RTOL, _check, _pair

import snl_kernels
from snl_kernels import precision, reference

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

EPS = reference.EPS


def _gram():
    from snl_kernels._triton import affinity_gram

    return affinity_gram


def _inputs(layout):
    t, s = _pair((2, 6, 5, 7), zero_pixel=True)
    if layout == "channels_last":
        return tuple(x.to(memory_format=torch.channels_last) for x in (t, s))
    return (t.half(), s.half()) if layout == "half" else (t, s)


def _tf32(x):
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((bits + 0x1000) & 0xFFFFE000).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dot", ["tf32", "ieee"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "half"])
def test_prepare_writes_the_norms_and_the_rounded_operands(dot, layout):
    t, s = _inputs(layout)
    from snl_kernels._triton import affinity

    ed, r_s, r_t = _gram().gram_prepare(s, t, EPS, dot)
    assert ed.shape == (2, 12, 35)
    assert ed.dtype == torch.float32
    for r, x in ((r_s, s), (r_t, t)):
        want = affinity.inv_norms(x, True, EPS)
        torch.testing.assert_close(r, want, rtol=1e-6, atol=0)
        assert torch.equal(r < 0, want < 0)  # zero pixels marked, as inv_norms marks them
    assert r_t[0, 0] < 0
    assert r_s[-1, -1] < 0
    xs = s.float().flatten(2) * r_s[:, None, :]
    xt = t.float().flatten(2) * r_t[:, None, :]
    want = torch.cat([xs + xt, xs - xt], dim=1)
    assert torch.equal(ed, _tf32(want) if dot == "tf32" else want)


@pytest.mark.parametrize("dot", ["tf32", "ieee"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 40, 8, 9)], ids=["one-tile", "tiles"])
def test_loss_from_prepared_operands_is_bit_equal(dot, shape):
    # The loss kernel reading [E; D] forms the same Grams as when it scales and adds the
    # features in registers with the same norms: at "tf32" the products' operands are the
    # same tf32 values, so partial sums and stored Grams are bit-equal; at "ieee" the
    # operands are the same fp32 values, and only the order of the products' sums may
    # differ (the interpreter's numpy takes a transposed operand another way).
    t, s = _pair(shape, zero_pixel=True)
    gram = _gram()
    ed, r_s, r_t = gram.gram_prepare(s, t, EPS, dot)
    parts, grams = gram.gram_loss(s, t, r_s, r_t, dot, store=2)
    parts_p, grams_p = gram.gram_loss(s, t, r_s, r_t, dot, store=2, prepared=ed)
    g = torch.tensor([0.5], device=DEVICE)
    want = gram.gram_grad(s, t, r_s, r_t, g, 0.25, True, dot)
    got = gram.gram_grad(s, t, r_s, r_t, g, 0.25, True, dot, prepared=ed)
    for a, b in zip((parts, *grams, *want), (parts_p, *grams_p, *got), strict=True):
        if dot == "tf32":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("dot", ["tf32", "ieee"])
def test_the_op_takes_the_prepared_path_and_meets_the_reference(monkeypatch, dot):
    monkeypatch.setenv(precision.ENV_VAR, dot)
    t, s = _pair((2, 6, 5, 7), zero_pixel=True)
    assert precision.intra_plan("triton", t, "l2") == (True, dot)
    gram = _gram()
    calls = []
    real = gram.gram_prepare
    monkeypatch.setattr(gram, "gram_prepare", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr("snl_kernels._triton.affinity.gram_prepare", gram.gram_prepare)
    _check(lambda a, b: snl_kernels.intra_affinity_loss(a, b, backend="triton"),
           lambda a, b: reference.intra_affinity_loss(a, b, "l2"), [(t, True), (s, False)],
           loss_rtol=LOSS_RTOL * (10 if dot == "tf32" else 1),
           grad_rtol=GRAD_RTOL * (10 if dot == "tf32" else 1))
    assert calls == [dot]  # the forward's, kept for the backward


def test_saved_and_recomputed_backwards_agree_on_the_prepared_path(monkeypatch):
    monkeypatch.setenv(precision.ENV_VAR, "tf32")
    ns = torch.ops.snl_triton
    t, s = _pair((2, 6, 4, 5), zero_pixel=True)
    g = torch.tensor(0.5, device=DEVICE)
    loss0, signs, _ = ns.intra_affinity_fwd(t, s, "l2", True, "tf32")
    loss, _, saved = ns.intra_affinity_fwd(t, s, "l2", True, "tf32", 2)
    assert torch.equal(loss, loss0)
    want = ns.intra_affinity_bwd(t, s, g, signs, "l2", True, "tf32", True)
    got = ns.intra_affinity_bwd(t, s, g, signs, "l2", True, "tf32", True, saved)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


def test_where_it_applies():
    gram = _gram()
    assert gram.prepared_applies(256, "tf32")
    assert gram.prepared_applies(512, "ieee")
    assert not gram.prepared_applies(256, "tf32x3")
    assert not gram.prepared_applies(gram.PREPARE_MAX_C + 1, "tf32")
    t, s = _pair((1, 4, 4, 4))
    with pytest.raises(ValueError, match="tf32x3"):
        gram.gram_prepare(s, t, EPS, "tf32x3")


@pytest.mark.parametrize("dot", ["tf32", "tf32x3"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "half"])
def test_backward_with_the_norm_in_the_epilogue_matches_two_launches(dot, layout):
    from snl_kernels._triton import affinity

    t, s = _inputs(layout)
    gram = _gram()
    r_s, r_t = affinity.inv_norms(s, True, EPS), affinity.inv_norms(t, True, EPS)
    g = torch.tensor([0.5], device=DEVICE)
    got = gram.gram_grad_features(s, t, r_s, r_t, g, 0.25, True, dot, EPS)
    normalised = gram.gram_grad(s, t, r_s, r_t, g, 0.25, True, dot)
    for f, r, gx, x in zip((s, t), (r_s, r_t), normalised, got, strict=True):
        out = None if f.dtype == torch.float32 else f.new_empty(f.shape)
        want = affinity.norm_backward(f, r, gx, True, EPS, out)
        assert x.dtype == f.dtype
        assert x.shape == f.shape
        assert x.is_contiguous()
        # One accumulator for both products instead of two: the sums' order differs. (The
        # zero pixels' gradients, r dx with r = 1 / eps, are the largest by far; the
        # tolerance is set by the others.)
        scale = want.float().abs().median().item()
        torch.testing.assert_close(x.float(), want.float(), rtol=1e-3 if layout == "half"
                                   else 1e-5, atol=1e-5 * scale)
    student_only = gram.gram_grad_features(s, t, r_s, r_t, g, 0.25, False, dot, EPS)
    assert student_only[1] is None
    assert torch.equal(student_only[0], got[0])


def test_the_op_backward_takes_the_fused_launch_up_to_its_channels(monkeypatch):
    gram = _gram()
    assert gram.apply_norm_applies(gram.APPLY_NORM_MAX_C)
    assert not gram.apply_norm_applies(gram.APPLY_NORM_MAX_C + 1)
    t, s = _pair((2, 6, 5, 7))
    calls = []
    real = gram.gram_grad_features
    monkeypatch.setattr("snl_kernels._triton.affinity.gram_grad_features",
                        lambda *a: calls.append(a[6]) or real(*a))
    s.requires_grad_(True)
    snl_kernels.intra_affinity_loss(t, s, backend="triton").backward()
    assert calls == [False]  # the student's gradient only
    with pytest.raises(ValueError, match="C = 300"):
        gram.gram_grad_features(*(torch.zeros(1, 300, 20, 20),) * 2, *(torch.zeros(1, 400),) * 2,
                                torch.ones(1), 1.0, False, "tf32", EPS)
