"""What the Triton affinity ops' forwards keep for their backwards (the ``store`` argument):
the intra-affinity loss's pixel norms and Gram-path Grams, the inter-affinity loss's pooled
finer level and channel norms. Given them, the backward recomputes nothing and gives the
same gradients, bit for bit; the public functions ask for them only where a gradient will
be needed."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
from support import DEVICE, NO_TRITON
from test_affinity import _inter_inputs, _pair

import snl_kernels
from snl_kernels import precision

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")


@pytest.mark.parametrize("channels", [6, 24], ids=["grams-for-l2", "tiles"])
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_triton_forward_keeps_what_the_backward_needs(monkeypatch, distance, channels):
    # With store, Triton's forward returns the pixels' inverse norms and (Gram path) the
    # Grams its loss kernel wrote; its backward given them runs neither the norm kernel nor
    # the loss kernel again, and gives the gradients it gives without them, bit for bit.
    ns = torch.ops.snl_triton
    t, s = _pair((2, channels, 4, 5), zero_pixel=True)
    g = torch.tensor(0.5, device=DEVICE)
    grams, dot = precision.intra_plan("triton", t, distance)
    assert grams == (distance == "l2" and channels < 20)
    loss0, signs0, saved0 = ns.intra_affinity_fwd(t, s, distance, grams, dot)
    assert saved0 == []
    affinity = importlib.import_module("snl_kernels._triton.affinity")
    gram = importlib.import_module("snl_kernels._triton.affinity_gram")
    for store, need_teacher in ((1, False), (2, True), (2, False)):
        loss, signs, saved = ns.intra_affinity_fwd(t, s, distance, grams, dot, store)
        assert torch.equal(loss, loss0)
        assert torch.equal(signs, signs0)
        # The norms, then the Gram path's Grams or the tiled l2 path's Delta (l1: its signs).
        assert len(saved) == 2 + (2 * store if grams else distance == "l2")
        want = ns.intra_affinity_bwd(t, s, g, signs, distance, grams, dot, need_teacher)
        with monkeypatch.context() as m:
            for module, name in ((affinity, "inv_norms"), (gram, "gram_loss")):
                m.setattr(module, name, mock.Mock(side_effect=AssertionError(name)))
            got = ns.intra_affinity_bwd(t, s, g, signs, distance, grams, dot, need_teacher,
                                        saved)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    # Grams kept for the student only: the teacher's gradient forms them again.
    saved = ns.intra_affinity_fwd(t, s, distance, grams, dot, 1)[2]
    want = ns.intra_affinity_bwd(t, s, g, signs0, distance, grams, dot, True)
    got = ns.intra_affinity_bwd(t, s, g, signs0, distance, grams, dot, True, saved)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_triton_inter_forward_keeps_what_the_backward_needs(monkeypatch):
    # With store, the pooled finer levels, the four sets of channel norms and dL/dDelta for
    # a unit upstream gradient; the backward given them forms no Delta and pools and
    # normalises nothing again, with the same gradients bit for bit (g = 0.5 scales exactly,
    # whether before the rounding of dL/dDelta or through the products' other operand).
    ns = torch.ops.snl_triton
    x = [x for x, _ in _inter_inputs(((2, 6, 6, 6), (10, 3, 3)))]
    g = torch.tensor(0.5, device=DEVICE)
    affinity = importlib.import_module("snl_kernels._triton.affinity")
    for distance in ("l2", "l1"):
        dot = precision.inter_plan("triton", x[0], x[1], distance)
        loss0, saved0 = ns.inter_affinity_fwd(*x, distance, dot)
        loss, saved = ns.inter_affinity_fwd(*x, distance, dot, 1)
        assert saved0 == []
        assert torch.equal(loss, loss0)
        shapes = [(2, 6, 3, 3)] * 2 + [(2, 6)] * 2 + [(2, 10)] * 2 + [(2, 6, 10)]
        assert [tuple(v.shape) for v in saved] == shapes
        for need_teacher in (True, False):
            want = ns.inter_affinity_bwd(*x, g, distance, dot, need_teacher)
            with monkeypatch.context() as m:
                for name in ("inv_norms", "pool", "pool_with_norms", "delta", "delta_group"):
                    m.setattr(affinity, name, mock.Mock(side_effect=AssertionError(name)))
                got = ns.inter_affinity_bwd(*x, g, distance, dot, need_teacher, saved)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)


def test_public_call_keeps_for_the_backward_only_what_a_gradient_needs(monkeypatch):
    module = importlib.import_module("snl_kernels.intra_affinity_loss")
    stores = []
    real = module._triton_fwd_body

    def spy(*args):
        stores.append(args[5])
        return real(*args)

    monkeypatch.setattr(module._FORWARD_OPS["triton"], "body", spy)
    t, s = _pair((1, 6, 4, 4))
    snl_kernels.intra_affinity_loss(t, s, backend="triton")
    with torch.no_grad():
        snl_kernels.intra_affinity_loss(t, s.requires_grad_(True), backend="triton")
    assert stores == [0, 0]
    forward = module._FORWARD_OPS["triton"]
    calls = []
    monkeypatch.setattr(forward, "apply", lambda held, *args: calls.append(args[5]) or
                        (torch.zeros(()),))
    snl_kernels.intra_affinity_loss(t, s, backend="triton")
    snl_kernels.intra_affinity_loss(t.requires_grad_(True), s, backend="triton")
    assert calls == [1, 2]
    inter = importlib.import_module("snl_kernels.inter_affinity_loss")._FORWARD_OPS["triton"]
    calls.clear()
    monkeypatch.setattr(inter, "apply", lambda held, *args: calls.append(args[6]) or
                        (torch.zeros(()),))
    monkeypatch.setattr(inter, "body", lambda *args: calls.append(args[6]) or
                        (torch.zeros(()), []))
    x = [x for x, _ in _inter_inputs(((1, 4, 4, 4), (6, 2, 2)))]
    snl_kernels.inter_affinity_loss(*x, backend="triton")
    x[2].requires_grad_(True)
    snl_kernels.inter_affinity_loss(*x, backend="triton")
    with torch.no_grad():
        snl_kernels.inter_affinity_loss(*x, backend="triton")
    assert calls == [0, 1, 0]


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_inter_backward_from_the_unit_gradient_meets_the_float64_bar(distance):
    # An upstream gradient that is not a power of two (0.3): the saved path scales the
    # products' other operand, where the recomputing path scales dL/dDelta before rounding
    # it; both are held to the float64 reference's gradients.
    ns = torch.ops.snl_triton
    x = [x for x, _ in _inter_inputs(((2, 6, 6, 6), (10, 3, 3)))]
    x64 = [v.detach().double().requires_grad_(True) for v in x]
    loss = snl_kernels.reference.inter_affinity_loss(*x64, distance)
    want = torch.autograd.grad(loss * 0.3, x64)
    g = torch.tensor(0.3, device=DEVICE)
    dot = precision.inter_plan("triton", x[0], x[1], distance)
    saved = ns.inter_affinity_fwd(*x, distance, dot, 1)[1]
    for extra in ((saved,), ()):
        got = ns.inter_affinity_bwd(*x, g, distance, dot, True, *extra)
        for a, b in zip(got, want, strict=True):
            err = (a.double() - b).norm() / b.norm().clamp_min(1e-30)
            assert err < 1e-3, (distance, bool(extra), float(err))


def test_inter_l1_keeps_the_signs_and_its_products_take_them_as_they_are(monkeypatch):
    # l1's unit gradient of Delta is sign(Delta) itself (exact in tf32): the products take
    # coef through alpha and, at tf32x3, only the two parts of their other operand
    # ("tf32x3-exact-b": no split of an operand read as stored, so no wait on Hopper).
    ns = torch.ops.snl_triton
    x = [x for x, _ in _inter_inputs(((2, 6, 6, 6), (10, 3, 3)))]
    dot = precision.inter_plan("triton", x[0], x[1], "l1")
    assert dot == "tf32x3"
    saved = ns.inter_affinity_fwd(*x, "l1", dot, 1)[1]
    signs = saved[-1]
    assert set(signs.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (signs != 0).any()
    affinity = importlib.import_module("snl_kernels._triton.affinity")
    jobs = []
    real = affinity.scaled_mm_group
    monkeypatch.setattr(affinity, "scaled_mm_group", lambda j: jobs.extend(j) or real(j))
    ns.inter_affinity_bwd(*x, torch.tensor(0.5, device=DEVICE), "l1", dot, True, saved)
    assert [job[4] for job in jobs] == ["tf32x3-exact-b"] * 4
    assert sorted(abs(job[3]) for job in jobs) == [1.0 / (2 * 6 * 10)] * 4
    # The same products as the general tf32x3 split of a sign matrix, up to the order of
    # the sums.
    g, y, r_y = signs, x[3], affinity.inv_norms(x[3], False, 1e-8)
    exact = affinity.scaled_mm(g, y, r_y, 0.25, "tf32x3-exact-b")
    general = affinity.scaled_mm(g, y, r_y, 0.25, "tf32x3")
    torch.testing.assert_close(exact, general, rtol=1e-6, atol=1e-7)
