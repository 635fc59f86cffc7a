"""cram: kernels against the float64 reference, values and all three gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, NO_TRITON, requires_gpu

import snl_kernels
from snl_kernels import reference

triton_only = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

# (B, D, h, w, K, log_tau), each with the reason it is here. BLOCK_P = 32, BLOCK_D = 64.
SHAPES = {
    "odd-positions-and-dims": (2, 40, 3, 5, 7, 1.0),
    "one-centre": (1, 130, 4, 4, 1, 0.5),
    "k-not-power-of-two": (2, 64, 8, 8, 33, 3.0),
    "one-position": (1, 16, 1, 1, 3, -2.0),
    "positions-one-past-block": (1, 24, 3, 11, 5, 1.5),
    "k-256": (1, 32, 2, 4, 256, 2.0),
}


def _inputs(B, D, h, w, K, log_tau, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = (scale * torch.randn(B, D, h, w, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    c = (scale * torch.randn(K, D, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    t = torch.tensor(log_tau, dtype=torch.float32, device=DEVICE)
    return [x.requires_grad_(True) for x in (e, c, t)]


def _check(e, c, t, atol=1e-5, grad_rtol=1e-4):
    out = snl_kernels.cram(e, c, t, backend="triton")
    e64, c64, t64 = (x.detach().double().requires_grad_(True) for x in (e, c, t))
    ref = reference.cram(e64, c64, t64)
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref]
    for a, r in zip(out, ref, strict=True):
        assert a.dtype == torch.float32
        assert torch.isfinite(a).all()
        scale = max(r.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double() / scale, r / scale, atol=atol, rtol=0)
    loss = sum((a * w.to(a.device, torch.float32)).sum() for a, w in zip(out, weights,
                                                                           strict=True))
    grads = torch.autograd.grad(loss, (e, c, t))
    ref_loss = sum((r * w.to(r.device)).sum() for r, w in zip(ref, weights, strict=True))
    ref_grads = torch.autograd.grad(ref_loss, (e64, c64, t64))
    for name, g, r, x in zip(("embedding", "centers", "log_tau"), grads, ref_grads, (e, c, t),
                             strict=True):
        assert g.dtype == x.dtype, name
        assert g.shape == x.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).norm().item()
        assert err <= grad_rtol * max(r.norm().item(), 1.0), (name, err, r.norm().item())


@triton_only
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(shape):
    _check(*_inputs(*shape))


@triton_only
@pytest.mark.parametrize(
    ("log_tau", "scale"),
    [(-20.0, 1.0), (20.0, 1.0), (0.0, 30.0)],
    ids=["tiny-tau", "huge-tau", "large-distances"],
)
def test_extreme_temperatures_and_distances_are_finite(log_tau, scale):
    _check(*_inputs(2, 48, 4, 4, 9, log_tau, scale=scale), atol=2e-5)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_inputs(dtype):
    _check(*_inputs(2, 40, 3, 5, 7, 1.0, dtype=dtype), grad_rtol=1e-2)


@triton_only
def test_float_log_tau_and_subset_of_gradients():
    e, c, _ = _inputs(2, 16, 2, 3, 4, 0.7)
    out = snl_kernels.cram(e, c, 0.7, backend="triton")
    out.compact.mean().backward()
    e64, c64 = (x.detach().double().requires_grad_(True) for x in (e, c))
    reference.cram(e64, c64, 0.7).compact.mean().backward()
    torch.testing.assert_close(e.grad.double(), e64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.grad.double(), c64.grad, atol=1e-6, rtol=1e-5)


@triton_only
def test_any_strides():
    e, c, t = _inputs(2, 24, 4, 6, 5, 1.0)
    e_cl = e.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    c_t = c.detach().T.contiguous().T.requires_grad_(True)
    a = snl_kernels.cram(e, c, t, backend="triton")
    b = snl_kernels.cram(e_cl, c_t, t, backend="triton")
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    sum(x.sum() for x in a).backward()
    sum(x.sum() for x in b).backward()
    torch.testing.assert_close(e.grad, e_cl.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c.grad, c_t.grad, atol=1e-6, rtol=1e-6)


@triton_only
def test_deterministic_bits():
    e, c, t = _inputs(2, 40, 4, 4, 9, 1.0)
    runs = []
    for _ in range(2):
        out = snl_kernels.cram(e, c, t, backend="triton")
        runs.append([*out, *torch.autograd.grad(sum(o.sum() for o in out), (e, c, t))])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


@triton_only
def test_opcheck():
    e, c, t = _inputs(2, 16, 2, 3, 5, 0.5)
    torch.library.opcheck(torch.ops.snl_triton.cram_fwd.default, (e, c, t))


def test_float64_is_refused_by_kernels():
    e = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match="float64 inputs run on the reference only"):
        snl_kernels.cram(e, torch.randn(3, 4, dtype=torch.float64), 0.0, backend="triton")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [16, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrn50_bottleneck_on_gpu(batch, dtype):
    e, c, t = _inputs(batch, 2048, 8, 8, 64, float(torch.tensor(2048.0).sqrt().log()), dtype=dtype)
    _check(e, c, t, grad_rtol=1e-4 if dtype == torch.float32 else 1e-2)
