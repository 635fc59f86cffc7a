"""Intra-affinity l1 at "tf32x3" from prepared operands (snl_kernels/_triton/
affinity_prepared.py): the routing, the prepared tensors themselves, and the results against
the kernels that split the operands in registers (the same products summed in another
order) and against float64."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, NO_TRITON

import snl_kernels
from snl_kernels import reference

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")


def _modules():
    from snl_kernels._triton import affinity_prepared, launch

    return affinity_prepared, launch


def _pair(shape, seed=0, noise=0.1, zero_pixel=True, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    s = t + noise * torch.randn(shape, generator=g)
    if zero_pixel:
        t[0, :, 0, 0] = 0
        s[0, :, 0, 0] = 0  # both zero: Delta's row and column are exactly 0
        s[-1, :, -1, -1] = 0
    t, s = t.to(DEVICE), s.to(DEVICE)
    if channels_last:
        t, s = (x.contiguous(memory_format=torch.channels_last) for x in (t, s))
    return t, s


def _launched(monkeypatch) -> list[str]:
    """The names of the kernels launched from now on (they still run)."""
    _, launch = _modules()
    names: list[str] = []

    def hook(fn, grid, args, options):
        names.append(fn.__name__)
        launch.bound(fn, grid, args, options)

    monkeypatch.setattr(launch, "hook", hook)
    return names


def _loss_and_grads(t, s, teacher_grad, distance="l1"):
    t = t.clone().requires_grad_(teacher_grad)
    s = s.clone().requires_grad_(True)
    loss = snl_kernels.intra_affinity_loss(t, s, distance, backend="triton")
    return loss, torch.autograd.grad(loss, [x for x in (t, s) if x.requires_grad])


def _unprepared(monkeypatch):
    prepared, _ = _modules()
    monkeypatch.setattr(prepared, "applies", lambda job: False)
    monkeypatch.setattr(prepared, "grad_applies", lambda job: False)


def test_l1_at_tf32x3_takes_the_prepared_kernels(monkeypatch):
    t, s = _pair((2, 12, 5, 7))
    names = _launched(monkeypatch)
    _loss_and_grads(t, s, teacher_grad=True)
    assert names.count("_prepare_kernel") == 2  # the forward's layout, the backward's
    assert "_delta_prepared_kernel" in names
    assert "_grad_prepared_kernel" in names
    assert "_delta_kernel" not in names
    assert "_intra_tiled_grad_kernel" not in names
    # Other precisions and l2 keep the kernels that form their operands in registers.
    for precision, distance in (("ieee", "l1"), ("tf32", "l1"), ("tf32x3", "l2")):
        monkeypatch.setenv("SNL_DOT_PRECISION", precision)
        names.clear()
        _loss_and_grads(t, s, teacher_grad=True, distance=distance)
        assert not [n for n in names if "prepare" in n], (precision, distance)


@pytest.mark.parametrize("rows", [True, False], ids=["forward", "backward"])
def test_prepared_tensors_are_the_split_normalised_features(rows):
    prepared, _ = _modules()
    from snl_kernels._triton import affinity

    t, s = _pair((2, 40, 5, 7), channels_last=True)
    r_t, r_s = affinity.inv_norms(t, True, reference.EPS), affinity.inv_norms(s, True,
                                                                              reference.EPS)
    hi, lo = prepared.prepare(s, t, r_s, r_t, rows=rows)
    B, C, H, W = s.shape
    x_s = (s.reshape(B, C, H * W) * r_s[:, None, :])
    x_t = (t.reshape(B, C, H * W) * r_t[:, None, :])
    if rows:  # (B, N, 3C): X_S, X_S - X_T, X_T
        want = torch.cat([x_s, x_s - x_t, x_t], dim=1).transpose(1, 2)
    else:  # (B, 2C, N): X_S, X_T
        want = torch.cat([x_s, x_t], dim=1)
    assert hi.shape == want.shape
    assert bool(((hi.view(torch.int32) & 0x1FFF) == 0).all())  # tf32 values
    assert bool(((lo.view(torch.int32) & 0x1FFF) == 0).all())
    # hi is want rounded to tf32; hi + lo is want to about 2^-21 of it.
    assert (hi - want).abs().max() <= 2.0 ** -11 * want.abs().max()
    torch.testing.assert_close(hi + lo, want, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "teacher-too"])
@pytest.mark.parametrize(("shape", "channels_last"), [
    ((2, 12, 5, 7), False),   # pixels not a multiple of the tile, channels of BK
    ((2, 40, 9, 9), True),    # several tiles; channels_last
    ((1, 70, 12, 11), False),  # several tiles each way
], ids=["small", "channels-last", "tiles"])
def test_equals_the_unprepared_kernels(monkeypatch, shape, channels_last, teacher_grad):
    t, s = _pair(shape, channels_last=channels_last)
    loss, grads = _loss_and_grads(t, s, teacher_grad)
    _unprepared(monkeypatch)
    want_loss, want_grads = _loss_and_grads(t, s, teacher_grad)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    for g, w in zip(grads, want_grads, strict=True):
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=1e-6)
    # And both against float64.
    t64 = t.double()
    s64 = s.double().requires_grad_(True)
    ref = reference.intra_affinity_loss(t64, s64, "l1")
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    err = (grads[-1].double() - ref_grad).norm() / ref_grad.norm()
    assert err.item() <= 1e-4


def test_equal_features_give_exactly_zero(monkeypatch):
    """A student equal to the teacher (the identity mapping): D and A_S - A_T are exactly 0,
    so every Delta and the loss are exactly 0, and the gradients (from sign bits that say
    "not > 0" everywhere) are the unprepared kernels' up to the order of their sums."""
    t, _ = _pair((2, 40, 9, 9))
    loss, grads = _loss_and_grads(t, t.clone(), teacher_grad=True)
    assert loss.item() == 0.0
    _unprepared(monkeypatch)
    want_loss, want_grads = _loss_and_grads(t, t.clone(), teacher_grad=True)
    assert want_loss.item() == 0.0
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * w.abs().max().item())


def test_fused_loss_l1_equals_the_unprepared_kernels(monkeypatch):
    """The fused loss's Delta launches mix prepared intra-affinity levels with grouped
    inter-affinity pairs; the results keep their order."""
    shapes = [(2, 8, 6, 6), (2, 12, 3, 3), (2, 16, 2, 2)]
    levels = [_pair(shape, seed=k) for k, shape in enumerate(shapes)]

    def run():
        teachers = [t.clone() for t, _ in levels]
        students = [s.clone().requires_grad_(True) for _, s in levels]
        out = snl_kernels.snl_distillation_loss(teachers, students, intra_distance="l1",
                                                inter_distance="l1", backend="triton")
        return out, torch.autograd.grad(sum(out.values()), students)

    names = _launched(monkeypatch)
    got, got_grads = run()
    assert names.count("_delta_prepared_kernel") == 3
    _unprepared(monkeypatch)
    want, want_grads = run()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9)
    for g, w in zip(got_grads, want_grads, strict=True):
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=1e-6)
