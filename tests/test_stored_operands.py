"""Operands one Triton kernel writes for another's products: the Gram path's P and Q (the
intra-affinity l2 loss kernel writes them for its backward) and dL/dDelta (the inter-affinity
Delta kernel writes it for the products with the levels). Under tf32 products they are
stored rounded to the nearest tf32 value, since the products read them as they are; their
values are held here to the float64 math of snl_kernels/intra_affinity_loss.py."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE

from snl_kernels import reference

pytest.importorskip("triton")

EPS = reference.EPS


def _ka():
    from snl_kernels._triton import affinity

    return affinity


def _is_tf32(x: torch.Tensor) -> bool:
    """Every value has a zero in the 13 mantissa bits tf32 drops."""
    return bool(((x.contiguous().view(torch.int32) & 0x1FFF) == 0).all())


def _features(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    s = t + 0.3 * torch.randn(shape, generator=g)
    return t.to(DEVICE), s.to(DEVICE)


def _normalised(f: torch.Tensor) -> torch.Tensor:
    """float64 (B, C, N) with every pixel's channel vector of norm 1."""
    f = f.double().flatten(2)
    return f / f.norm(dim=1, keepdim=True).clamp_min(EPS)


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_gram_loss_stores_p_and_q_for_the_backward(precision):
    ka = _ka()
    t, s = _features((2, 70, 9, 9), 0)  # three tiles of channels under the interpreter
    r_t, r_s = ka.inv_norms(t, True, EPS), ka.inv_norms(s, True, EPS)
    _, grams = ka.gram_loss(s, t, r_s, r_t, precision, store=2)
    x_s, x_t = _normalised(s), _normalised(t)
    e, d = x_s + x_t, x_s - x_t
    want = [x @ y.transpose(1, 2) / 2 for x in (x_s, x_t) for y in (e, d)]
    # tf32: operands and stored values rounded to 11 bits (relative 2^-11 each).
    tol = 2e-3 if precision == "tf32" else 1e-5
    for name, got, ref in zip(("P_S", "Q_S", "P_T", "Q_T"), grams, want, strict=True):
        err = (got.double().cpu() - ref.cpu()).norm() / ref.norm()
        assert err <= tol, (name, float(err))
        assert _is_tf32(got) == (precision == "tf32"), name


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_delta_gradient_is_stored_as_the_products_operand(precision):
    ka = _ka()
    (a_t, a_s), (b_t, b_s) = _features((2, 12, 4, 4), 1), _features((2, 20, 4, 4), 2)
    r = [ka.inv_norms(x, False, EPS) for x in (a_s, a_t, b_s, b_t)]
    g = torch.ones(1, device=a_t.device)
    job = dict(a_s=a_s, a_t=a_t, b_s=b_s, b_t=b_t, r_as=r[0], r_at=r[1], r_bs=r[2], r_bt=r[3],
               pix_rows=False, l1=False, precision=precision, grad=(g, 2.0))
    (gd,) = ka.delta_group([job])
    rows = [x.double().flatten(2) for x in (a_s, a_t, b_s, b_t)]
    p_s, p_t, q_s, q_t = (x / x.norm(dim=2, keepdim=True) for x in rows)
    delta = p_t @ q_t.transpose(1, 2) - p_s @ q_s.transpose(1, 2)
    err = (gd.double().cpu() - 2 * delta.cpu()).norm() / (2 * delta).norm()
    assert err <= (2e-3 if precision == "tf32" else 1e-5)
    assert _is_tf32(gd) == (precision == "tf32")
    # The product with a level (its rows scaled by their inverse norms).
    y, r_y = b_s, r[2]
    want = -(gd.double() @ (y.double().flatten(2) * r_y.double()[:, :, None]))
    got = ka.scaled_mm(gd, y, r_y, -1.0, precision).double().flatten(2)
    assert ((got - want).norm() / want.norm()).item() <= (2e-3 if precision == "tf32" else 1e-5)
