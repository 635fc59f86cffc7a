"""Inter-affinity l1 at "tf32x3" from prepared operands (snl_kernels/_triton/
affinity_prepared.py): level b's channels normalised, differenced and split into tf32 parts
in one launch that also forms their norms; the Delta kernel reading them; the backward's
products taking l1's sign(Delta) as it is ("tf32x3-exact-b"). Held to the kernels that split
every operand in registers (the same products summed in another order) and to float64."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, NO_TRITON
from test_affinity import _inter_inputs

import snl_kernels
from snl_kernels import reference

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

EPS = reference.EPS


def _modules():
    from snl_kernels._triton import affinity, affinity_prepared, launch

    return affinity, affinity_prepared, launch


def _loss_and_grads(x, distance="l1"):
    x = [v.detach().clone().requires_grad_(True) for v in x]
    loss = snl_kernels.inter_affinity_loss(*x, distance, backend="triton")
    return loss, torch.autograd.grad(loss, x)


def test_prepare_writes_the_norms_and_the_split_operands():
    affinity, prepared, _ = _modules()
    _, t_b, _, s_b = [x for x, _ in _inter_inputs(((2, 6, 6, 6), (10, 3, 3)))]
    s_b = s_b.contiguous(memory_format=torch.channels_last)
    s_b[0, 3] = 0  # a zero channel: its norm is marked negative
    r_s, r_t, hi, lo = prepared.inter_prepare(s_b, t_b, EPS)
    for r, x in ((r_s, s_b), (r_t, t_b)):
        want = affinity.inv_norms(x, False, EPS)
        torch.testing.assert_close(r, want, rtol=1e-6, atol=0)
        assert torch.equal(r < 0, want < 0)
    assert r_s[0, 3] < 0
    x_s = s_b.reshape(2, 10, 9) * r_s[:, :, None]
    x_t = t_b.reshape(2, 10, 9) * r_t[:, :, None]
    want = torch.cat([x_s - x_t, x_t], dim=1)
    assert hi.shape == want.shape
    assert bool(((hi.view(torch.int32) & 0x1FFF) == 0).all())  # tf32 values
    assert bool(((lo.view(torch.int32) & 0x1FFF) == 0).all())
    torch.testing.assert_close(hi + lo, want, rtol=2e-6, atol=1e-9)


def test_l1_at_tf32x3_takes_the_prepared_kernels(monkeypatch):
    _, _, launch = _modules()
    x = [x for x, _ in _inter_inputs(((2, 6, 6, 6), (10, 3, 3)))]
    names: list[str] = []

    def hook(fn, grid, args, options):
        names.append(fn.__name__)
        launch.bound(fn, grid, args, options)

    monkeypatch.setattr(launch, "hook", hook)
    _loss_and_grads(x)
    assert names.count("_inter_prepare_kernel") == 1  # the backward reads what it kept
    assert "_inter_delta_prepared_kernel" in names
    assert "_delta_kernel" not in names
    assert "_inv_norm_kernel" not in names
    names.clear()
    _loss_and_grads(x, "l2")  # l2 keeps the kernels that form their operands in registers
    assert not [n for n in names if "prepare" in n]


@pytest.mark.parametrize("shapes", [((2, 6, 6, 6), (10, 3, 3)), ((1, 40, 10, 9), (70, 5, 4))],
                         ids=["small", "tiles"])
def test_equals_the_unprepared_kernels_and_meets_float64(monkeypatch, shapes):
    _, prepared, _ = _modules()
    x = [x for x, _ in _inter_inputs(shapes, noise=0.1)]
    loss, grads = _loss_and_grads(x)
    monkeypatch.setattr(prepared, "inter_applies", lambda *a: False)
    monkeypatch.setattr("snl_kernels._triton.affinity.inter_applies", lambda *a: False)
    want_loss, want_grads = _loss_and_grads(x)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    for g, w in zip(grads, want_grads, strict=True):
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=1e-6)
    x64 = [v.detach().double().requires_grad_(True) for v in x]
    ref = reference.inter_affinity_loss(*x64, "l1")
    ref_grads = torch.autograd.grad(ref, x64)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    for g, r in zip(grads, ref_grads, strict=True):
        assert ((g.double() - r).norm() / r.norm()).item() <= 1e-4


def test_exact_b_products_equal_the_general_split_of_a_sign_matrix():
    affinity, _, _ = _modules()
    g = torch.Generator().manual_seed(3)
    signs = torch.randint(-1, 2, (2, 7, 10), generator=g).float().to(DEVICE)
    y = torch.randn((2, 10, 5, 4), generator=g).to(DEVICE)
    r_y = affinity.inv_norms(y, False, EPS)
    exact = affinity.scaled_mm(signs, y, r_y, 0.25, "tf32x3-exact-b")
    general = affinity.scaled_mm(signs, y, r_y, 0.25, "tf32x3")
    torch.testing.assert_close(exact, general, rtol=1e-6, atol=1e-7)
    ieee = affinity.scaled_mm(signs.double().float(), y, r_y, 0.25, "ieee")
    torch.testing.assert_close(exact, ieee, rtol=1e-5, atol=1e-6)
