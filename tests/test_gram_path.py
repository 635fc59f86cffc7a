"""The PyTorch Gram form of the intra-affinity l2 loss (snl_kernels/gram_path.py), which
automatic mode runs where no kernel backend can: held to the float64 reference with the
affinity ops' accuracy bar, and routed only where it applies."""

from __future__ import annotations

import pytest
import torch

import snl_kernels
from snl_kernels import gram_path, reference

LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3


def _pair(shape, noise=0.7, seed=0, zero_pixel=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    s = t * (1 + noise * torch.randn(shape, generator=g, dtype=torch.float64))
    if zero_pixel:
        t[0, :, 0, 0] = 0
        s[-1, :, -1, -1] = 0
    return t, s


@pytest.mark.parametrize("shape", [(2, 20, 5, 7), (3, 24, 32, 32), (1, 1, 4, 5), (2, 40, 16, 16)])
@pytest.mark.parametrize("noise", [0.7, 0.01], ids=["far", "close"])
def test_matches_the_float64_reference(shape, noise):
    t64, s64 = _pair(shape, noise)
    t64.requires_grad_(True)
    s64.requires_grad_(True)
    t, s = (x.detach().float().requires_grad_(True) for x in (t64, s64))
    loss = gram_path.intra_affinity_l2(t, s)
    ref = reference.intra_affinity_loss(t64, s64, "l2")
    assert loss.dtype == torch.float32
    assert loss.shape == ()
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL * ref.item()
    got = torch.autograd.grad(loss, (t, s))
    want = torch.autograd.grad(ref, (t64, s64))
    for g, r in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert (g.double() - r).norm().item() <= GRAD_RTOL * r.norm().item() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_float32(dtype):
    t, s = (x.to(dtype) for x in _pair((2, 8, 6, 6)))
    loss = snl_kernels.intra_affinity_loss(t, s)
    ref = reference.intra_affinity_loss(t.double(), s.double())
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL * ref.item()


def test_equal_features_give_zero():
    t, _ = _pair((2, 8, 6, 6))
    assert gram_path.intra_affinity_l2(t.float(), t.float()).item() == pytest.approx(0, abs=1e-9)


def test_under_autocast_the_loss_stays_float32():
    t, s = (x.float() for x in _pair((2, 8, 6, 6)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = snl_kernels.intra_affinity_loss(t, s)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.intra_affinity_loss(t, s).item(), rel=1e-5)


class _Spy:
    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for module, name in ((gram_path, "intra_affinity_l2"), (reference, "intra_affinity_loss")):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(module.__name__, original))

    def _wrap(self, label, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(label.rsplit(".", 1)[-1])
            return fn(*args, **kwargs)
        return wrapper


@pytest.mark.parametrize(("shape", "dtype", "distance", "backend", "env", "path"), [
    ((2, 8, 6, 6), torch.float32, "l2", None, None, "gram_path"),       # automatic, C < N
    ((2, 8, 6, 6), torch.float16, "l2", None, "auto", "gram_path"),
    ((2, 8, 6, 6), torch.float32, "l2", "torch", None, "reference"),    # asked for: the spec
    ((2, 8, 6, 6), torch.float32, "l2", None, "torch", "reference"),
    ((2, 8, 6, 6), torch.float32, "l1", None, None, "reference"),       # no Gram form for l1
    ((2, 40, 3, 3), torch.float32, "l2", None, None, "reference"),      # C >= N: tiles
    ((2, 8, 6, 6), torch.float64, "l2", None, None, "reference"),       # the exact oracle
])
def test_automatic_mode_routes_only_where_the_gram_form_applies(
        monkeypatch, shape, dtype, distance, backend, env, path):
    if env is None:
        monkeypatch.delenv("SNL_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SNL_BACKEND", env)
    spy = _Spy(monkeypatch)
    t, s = (x.to(dtype) for x in _pair(shape))
    snl_kernels.intra_affinity_loss(t, s, distance, backend=backend)
    assert spy.calls == [path]
