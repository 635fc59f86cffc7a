"""The PyTorch shared path (snl_kernels/shared_torch.py) that automatic mode runs without
kernels: every term and gradient held to the float64 reference ops, and routed only where
automatic mode would run the reference."""

from __future__ import annotations

import pytest
import torch

import snl_kernels
from snl_kernels import distillation, reference, shared_torch

# Fine to coarse: the Gram form at the first two levels (C < N), N x N matrices at the last.
SHAPES = [(2, 6, 8, 8), (2, 10, 4, 4), (2, 20, 2, 2)]
WEIGHTS = {"rd": 1.0, "channel": 0.7, "spatial": 0.5, "intra": 3.0, "inter": 2.0}
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _levels(noise=0.3, seed=0, zero=True, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    teachers, students = [], []
    for shape in shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        s = t + noise * torch.randn(shape, generator=g, dtype=torch.float64)
        if zero:  # a zero pixel in each, and a zero channel: clamped norms
            t[0, :, 0, 0] = 0
            s[-1, :, -1, -1] = 0
            s[0, 1] = 0
        teachers.append(t)
        students.append(s)
    return teachers, students


def _loss_and_grads(fn, teachers, students):
    terms = fn(teachers, students)
    loss = sum(WEIGHTS[name] * value for name, value in terms.items())
    return terms, torch.autograd.grad(loss, [*teachers, *students])


def _grad_inputs(levels, dtype):
    return [[x.to(dtype).requires_grad_(True) for x in group] for group in levels]


@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("noise", [0.3, 1e-3], ids=["far", "close"])
def test_every_term_and_gradient_matches_the_float64_reference(distance, noise):
    levels = _levels(noise)
    t32, s32 = _grad_inputs(levels, torch.float32)
    t64, s64 = _grad_inputs(levels, torch.float64)

    def shared(t, s):
        return shared_torch.distillation_terms(t, s, distillation.TERMS, distance, distance)

    def separate(t, s):
        return distillation._separate(t, s, distillation.TERMS, distance, distance, "torch")

    got, got_grads = _loss_and_grads(shared, t32, s32)
    want, want_grads = _loss_and_grads(separate, t64, s64)
    assert list(got) == list(distillation.TERMS)
    for name, value in got.items():
        assert value.dtype == torch.float32
        assert value.shape == ()
        assert abs(value.item() - want[name].item()) <= LOSS_RTOL * abs(want[name].item()) + 1e-9, (
            name, value.item(), want[name].item())
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(g).all()
        assert (g.double() - w).norm().item() <= GRAD_RTOL * w.norm().item() + 1e-9


def test_pooling_where_the_sizes_do_not_divide():
    levels = _levels(shapes=[(2, 6, 7, 9), (2, 10, 3, 4), (2, 12, 2, 2)])
    t32, s32 = _grad_inputs(levels, torch.float32)
    t64, s64 = _grad_inputs(levels, torch.float64)
    got, got_grads = _loss_and_grads(
        lambda t, s: shared_torch.distillation_terms(t, s, ("inter",), "l2", "l2"), t32, s32)
    want, want_grads = _loss_and_grads(
        lambda t, s: distillation._separate(t, s, ("inter",), "l2", "l2", "torch"), t64, s64)
    assert got["inter"].item() == pytest.approx(want["inter"].item(), rel=LOSS_RTOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g.double() - w).norm().item() <= GRAD_RTOL * w.norm().item() + 1e-9


@pytest.mark.parametrize("terms", [("rd",), ("spatial", "rd"), ("channel",), ("intra",),
                                   ("inter", "channel"), ("rd", "spatial", "intra")])
def test_subsets_of_terms(terms):
    levels = _levels()
    t32, s32 = _grad_inputs(levels, torch.float32)
    got = shared_torch.distillation_terms(t32, s32, terms, "l2", "l1")
    want = distillation._separate(*levels, terms, "l2", "l1", "torch")
    assert list(got) == list(terms)
    for name in terms:
        assert got[name].item() == pytest.approx(want[name].item(), rel=LOSS_RTOL, abs=1e-9)
    # every input the terms read gets a gradient
    grads = torch.autograd.grad(sum(got.values()), s32, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    teachers, students = (list(x.to(dtype) for x in group) for group in _levels())
    got = snl_kernels.snl_distillation_loss(teachers, students)
    want = distillation._separate([t.double() for t in teachers], [s.double() for s in students],
                                  distillation.TERMS, "l2", "l2", "torch")
    for name, value in got.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(want[name].item(), rel=1e-5, abs=1e-9)


def test_cosine_distances_match_the_reference():
    (t, *_), (s, *_) = _levels()
    t, s = (x.float().requires_grad_(True) for x in (t, s))
    got = snl_kernels.cosine_distances(t, s)  # automatic: this path on the CPU
    want = reference.cosine_distances(t.double(), s.double())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(sum(d.sum() for d in got), (t, s))
    t64, s64 = (x.detach().double().requires_grad_(True) for x in (t, s))
    want_grads = torch.autograd.grad(sum(d.sum() for d in reference.cosine_distances(t64, s64)),
                                     (t64, s64))
    for g, w in zip(grads, want_grads, strict=True):
        assert (g.double() - w).norm().item() <= GRAD_RTOL * w.norm().item()


def test_equal_features_give_zero_losses():
    teachers, _ = _levels(zero=False)  # a zero vector is at distance 1 from itself
    t = [x.float() for x in teachers]
    got = shared_torch.distillation_terms(t, [x.clone() for x in t], distillation.TERMS, "l2",
                                          "l1")
    for name, value in got.items():
        assert value.item() == pytest.approx(0, abs=1e-6), name


class _Spy:
    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ("distillation_terms", "cosine_distances"):
            original = getattr(shared_torch, name)
            monkeypatch.setattr(shared_torch, name, self._wrap(name, original))

    def _wrap(self, label, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(label)
            return fn(*args, **kwargs)
        return wrapper


def test_automatic_mode_on_the_cpu_takes_this_path(monkeypatch):
    monkeypatch.delenv("SNL_BACKEND", raising=False)
    spy = _Spy(monkeypatch)
    teachers, students = (list(x.float() for x in group) for group in _levels())
    snl_kernels.snl_distillation_loss(teachers, students)
    snl_kernels.cosine_distances(teachers[0], students[0])
    snl_kernels.spatial_channel_loss(teachers, students)
    assert spy.calls == ["distillation_terms", "cosine_distances"] + ["cosine_distances"] * 3


@pytest.mark.parametrize("how", ["argument", "environment", "float64"])
def test_the_reference_where_it_is_asked_for_or_float64(how, monkeypatch):
    monkeypatch.delenv("SNL_BACKEND", raising=False)
    spy = _Spy(monkeypatch)
    dtype = torch.float64 if how == "float64" else torch.float32
    teachers, students = (list(x.to(dtype) for x in group) for group in _levels())
    backend = "torch" if how == "argument" else None
    if how == "environment":
        monkeypatch.setenv("SNL_BACKEND", "torch")
    snl_kernels.snl_distillation_loss(teachers, students, backend=backend)
    snl_kernels.cosine_distances(teachers[0], students[0], backend=backend)
    assert spy.calls == []


def test_norms_are_the_clamped_vector_norms():
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    x[0, :, 1, 1] = 0
    x[1, :, 2, 2] = 1e-12
    for dim in (1, (2, 3), (1, 2, 3)):
        got = reference.clamped_norm(x, dim)
        want = torch.linalg.vector_norm(x, dim=dim).clamp_min(reference.EPS)
        torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    # a zero vector and one under eps: finite, zero gradients, as the clamped vector norm's
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(reference.clamped_norm(x, 1).sum(), x)
    assert torch.isfinite(grad).all()
    assert grad[0, :, 1, 1].abs().max() == 0
    assert grad[1, :, 2, 2].abs().max() == 0


def test_cram_outputs_are_contiguous():
    # A channels-last view here carries its layout into the decoder's batch norms.
    e = torch.randn(2, 8, 3, 5)
    out = reference.cram(e, torch.randn(4, 8), 0.0)
    assert out.central.is_contiguous()
    assert out.assign.is_contiguous()
