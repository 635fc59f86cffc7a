"""cram: kernels against the float64 reference, values and all three gradients."""

from __future__ import annotations

import pytest
import torch
from support import (
    ATOL,
    DEVICE,
    DTYPES,
    NO_CUDA_BACKEND,
    NO_EXTENSION,
    kernel_backends,
    requires_gpu,
)

import snl_kernels
from snl_kernels import reference

cuda_backend = [
    pytest.mark.gpu,
    pytest.mark.skipif(NO_CUDA_BACKEND is not None, reason=NO_CUDA_BACKEND or ""),
]

# (B, D, h, w, K, log_tau), each with the reason it is here. Triton: BLOCK_P = 32,
# BLOCK_D = 64. CUDA: cuBLAS products, row kernels of 4 positions (one warp each, K over the
# lanes: 8 per lane at K = 256).
SHAPES = {
    "odd-positions-and-dims": (2, 40, 3, 5, 7, 1.0),
    "one-centre": (1, 130, 4, 4, 1, 0.5),
    "k-not-power-of-two": (2, 64, 8, 8, 33, 3.0),
    "one-position": (1, 16, 1, 1, 3, -2.0),
    "positions-one-past-block": (1, 24, 3, 11, 5, 1.5),
    "k-256": (1, 32, 2, 4, 256, 2.0),
    # (log_tau 1: large distances over a small temperature, where the log_tau gradient
    # cancels unless the distances are taken from each row's minimum.)
    "channels-past-a-block": (1, 129, 3, 3, 40, 1.0),
}


def _inputs(B, D, h, w, K, log_tau, dtype=torch.float32, scale=1.0, seed=0, centers_dtype=None):
    g = torch.Generator().manual_seed(seed)
    e = (scale * torch.randn(B, D, h, w, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    c = (scale * torch.randn(K, D, generator=g, dtype=torch.float64)).to(DEVICE,
                                                                         centers_dtype or dtype)
    t = torch.tensor(log_tau, dtype=torch.float32, device=DEVICE)
    return [x.requires_grad_(True) for x in (e, c, t)]


def _check(backend, e, c, t, atol=1e-5, grad_rtol=1e-4):
    """``backend``: a backend name, or a function of (e, c, t) returning the three outputs."""
    out = backend(e, c, t) if callable(backend) else snl_kernels.cram(e, c, t, backend=backend)
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


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(backend, shape):
    _check(backend, *_inputs(*shape))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize(
    ("log_tau", "scale"),
    [(-20.0, 1.0), (20.0, 1.0), (0.0, 30.0)],
    ids=["tiny-tau", "huge-tau", "large-distances"],
)
def test_extreme_temperatures_and_distances_are_finite(backend, log_tau, scale):
    _check(backend, *_inputs(2, 48, 4, 4, 9, log_tau, scale=scale), atol=2e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_inputs(backend, dtype):
    _check(backend, *_inputs(2, 40, 3, 5, 7, 1.0, dtype=dtype), grad_rtol=1e-2)


@pytest.mark.parametrize("backend", kernel_backends())
def test_centres_in_another_dtype(backend):
    # Each gradient comes back in the dtype of its input.
    e, c, t = _inputs(2, 40, 3, 5, 7, 1.0, dtype=torch.bfloat16, centers_dtype=torch.float32)
    _check(backend, e, c, t, grad_rtol=1e-2)


@pytest.mark.parametrize("backend", kernel_backends())
def test_float_log_tau_and_subset_of_gradients(backend):
    e, c, _ = _inputs(2, 16, 2, 3, 4, 0.7)
    out = snl_kernels.cram(e, c, 0.7, backend=backend)
    out.compact.mean().backward()
    e64, c64 = (x.detach().double().requires_grad_(True) for x in (e, c))
    reference.cram(e64, c64, 0.7).compact.mean().backward()
    torch.testing.assert_close(e.grad.double(), e64.grad.to(e.device), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.grad.double(), c64.grad.to(c.device), atol=1e-6, rtol=1e-5)


def _assert_same_results(backend, inputs_a, inputs_b, grads_of):
    """cram on two layouts of the same values: same outputs, and the same gradients for each
    (a, b) pair of inputs in ``grads_of`` after a backward of every output's sum (.sum()
    sends expanded, zero-stride, upstream gradients).

    The tolerance is fp32 rounding: under the interpreter both layouts agree to 1e-6; on a
    GPU a channels-last embedding takes other tiles through the tensor-core products, and
    results differ by up to 2.4e-6 absolute, 1.7e-5 relative (H200 round, 2026-11-30)."""
    tol = 1e-6 if DEVICE == "cpu" else 1e-5
    a = snl_kernels.cram(*inputs_a, backend=backend)
    b = snl_kernels.cram(*inputs_b, backend=backend)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)
    sum(x.sum() for x in a).backward()
    sum(x.sum() for x in b).backward()
    for x, y in grads_of:
        torch.testing.assert_close(x.grad, y.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", kernel_backends())
def test_any_strides(backend):
    e, c, t = _inputs(2, 24, 4, 6, 5, 1.0)
    e_cl = e.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    c_t = c.detach().T.contiguous().T.requires_grad_(True)
    _assert_same_results(backend, (e, c, t), (e_cl, c_t, t), grads_of=((e, e_cl), (c, c_t)))
    assert e_cl.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", kernel_backends())
def test_sliced_embedding(backend):
    e, _, t = _inputs(2, 48, 6, 10, 5, 1.0)
    c = _inputs(1, 24, 1, 1, 5, 1.0, seed=1)[1]
    view = e.detach()[:, ::2, 1:, ::3].requires_grad_(True)  # (2, 24, 5, 4), no dense layout
    same = view.detach().contiguous().requires_grad_(True)
    _assert_same_results(backend, (view, c, t), (same, c, t), grads_of=((view, same),))


@pytest.mark.parametrize("backend", kernel_backends())
def test_deterministic_bits(backend):
    e, c, t = _inputs(2, 40, 4, 4, 9, 1.0)
    runs = []
    for _ in range(2):
        out = snl_kernels.cram(e, c, t, backend=backend)
        runs.append([*out, *torch.autograd.grad(sum(o.sum() for o in out), (e, c, t))])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    ns = {"triton": torch.ops.snl_triton, "cuda": getattr(torch.ops, "snl", None)}[backend]
    e, c, t = _inputs(2, 16, 2, 3, 5, 0.5)
    torch.library.opcheck(ns.cram_fwd.default, (e, c, t))
    central, assign, compact, dist = ns.cram_fwd(e.detach(), c.detach(), t.detach())
    grads = [torch.randn_like(x) for x in (central, assign, compact)]
    torch.library.opcheck(ns.cram_bwd.default,
                          (e.detach(), c.detach(), t.detach(), assign, dist, *grads))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64_is_refused_by_kernels(backend):
    e = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match="float64 inputs run on the reference only"):
        snl_kernels.cram(e, torch.randn(3, 4, dtype=torch.float64), 0.0, backend=backend)


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=cuda_backend)])
class TestCudaOpErrors:
    """The CUDA ops check their own inputs: each error names the argument and the value."""

    def _args(self, K=5, D=8):
        e, c, t = _inputs(2, D, 3, 3, K, 0.5)
        return e.detach(), c.detach(), t.detach()

    def test_too_many_centres(self, backend):
        e, c, t = _inputs(1, 8, 2, 2, 257, 0.5)
        with pytest.raises(RuntimeError, match=r"centers must hold 1 to 256 centres for the "
                                               r"CUDA kernels, got K=257"):
            snl_kernels.cram(e, c, t, backend=backend)

    def test_cpu_embedding(self, backend):
        e, c, t = self._args()
        with pytest.raises(RuntimeError, match=r"embedding must be a CUDA tensor, got device cpu"):
            torch.ops.snl.cram_fwd(e.cpu(), c, t)

    def test_float64_embedding(self, backend):
        e, c, t = self._args()
        with pytest.raises(RuntimeError, match=r"embedding must be float32, float16 or "
                                               r"bfloat16, got Double"):
            torch.ops.snl.cram_fwd(e.double(), c, t)

    def test_centre_width(self, backend):
        e, c, t = self._args()
        with pytest.raises(RuntimeError, match=r"centers must have width D=8 \(the channels of "
                                               r"embedding\), got shape \[5, 7\]"):
            torch.ops.snl.cram_fwd(e, c[:, :7], t)

    def test_log_tau_not_scalar(self, backend):
        e, c, t = self._args()
        with pytest.raises(RuntimeError, match=r"log_tau must hold one element, got shape \[2\]"):
            torch.ops.snl.cram_fwd(e, c, t.reshape(1).expand(2))

    def test_backward_shapes(self, backend):
        e, c, t = self._args()
        central, assign, compact, dist = torch.ops.snl.cram_fwd(e, c, t)
        with pytest.raises(RuntimeError, match=r"assign must have shape \[2, 5, 3, 3\], "
                                               r"got \[2, 4, 3, 3\]"):
            torch.ops.snl.cram_bwd(e, c, t, assign[:, :4], dist, central, assign, compact)
        with pytest.raises(RuntimeError, match=r"grad_compact must be Float, got Half"):
            torch.ops.snl.cram_bwd(e, c, t, assign, dist, central, assign, compact.half())


@requires_gpu
@pytest.mark.gpu
def test_automatic_mode_leaves_many_centres_to_triton():
    e, c, t = _inputs(1, 8, 2, 2, 257, 0.5)
    out = snl_kernels.cram(e, c, t)
    ref = reference.cram(e.detach().double(), c.detach().double(), t.detach().double())
    torch.testing.assert_close(out.assign.double(), ref.assign, atol=1e-5, rtol=0)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("batch", [16, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrn50_bottleneck_on_gpu(backend, batch, dtype):
    e, c, t = _inputs(batch, 2048, 8, 8, 64, float(torch.tensor(2048.0).sqrt().log()), dtype=dtype)
    _check(backend, e, c, t, atol=ATOL[dtype], grad_rtol=1e-4 if dtype == torch.float32 else 1e-2)


# ---- The CUDA backend's composition (csrc/cram_host.h) through torch.ops.snl on any device:
# cuBLAS products and the CUDA row kernels on a GPU; on a CPU the same composition with its row
# steps as ATen ops (csrc/cram_cpu.cpp), so that its layouts, chunks and dtypes are checked on
# machines without a GPU (the row kernels themselves: tests/test_cuda_emulation.py).

composition = pytest.mark.skipif(NO_EXTENSION is not None, reason=NO_EXTENSION or "")


def _composition(e, c, t):
    return torch.ops.snl.cram_fwd(e, c, t)[:3]


@composition
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_composition_matches_reference(shape):
    _check(_composition, *_inputs(*shape))


@composition
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_composition_low_precision(dtype):
    _check(_composition, *_inputs(2, 40, 3, 5, 7, 1.0, dtype=dtype), grad_rtol=1e-2)


@composition
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
def test_composition_in_chunks(dtype):
    """K = 256, D = 2048 at 2 x 2: 2.1 MB (float32) or 2.2 MB (float16) of temporaries per
    image in the backward, so 70 images run in three chunks of the 64 MiB budget."""
    e, c, t = _inputs(70, 2048, 2, 2, 256, 4.0, dtype=dtype, scale=0.1)
    _check(_composition, e, c, t, grad_rtol=1e-4 if dtype == torch.float32 else 1e-2)


@composition
def test_composition_layouts():
    """channels_last and a strided view give the same values and gradients as a dense copy,
    and the gradient keeps channels_last."""
    e, c, t = _inputs(2, 48, 6, 10, 5, 1.0)
    c_half = _inputs(1, 24, 1, 1, 5, 1.0, seed=1)[1]
    views = {
        "channels_last": (e.detach().contiguous(memory_format=torch.channels_last), c),
        "strided": (e.detach()[:, ::2, 1:, ::3], c_half),  # (2, 24, 5, 4), no dense layout
    }
    for name, (x, c) in views.items():
        x = x.requires_grad_(True)
        same = x.detach().contiguous().requires_grad_(True)
        a, b = _composition(x, c, t), _composition(same, c, t)
        (gx,) = torch.autograd.grad(sum(o.sum() for o in a), x)
        (gs,) = torch.autograd.grad(sum(o.sum() for o in b), same)
        # fp32 rounding of products taken in another order, relative to each tensor's scale:
        # DESIGN §4's CRAM bar (1e-5). The BLAS may block a layout's GEMM differently from one
        # run to the next (it failed once at 2e-6 in CI, same code, same machine kind).
        for u, v in zip([*a, gx], [*b, gs], strict=True):
            scale = max(v.abs().max().item(), 1.0)
            torch.testing.assert_close(u / scale, v / scale, atol=1e-5, rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")
        if name == "channels_last":
            assert gx.is_contiguous(memory_format=torch.channels_last)


@composition
def test_composition_deterministic_bits():
    e, c, t = _inputs(3, 40, 4, 4, 9, 1.0)
    runs = []
    for _ in range(2):
        out = _composition(e, c, t)
        runs.append([*out, *torch.autograd.grad(sum(o.sum() for o in out), (e, c, t))])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


@composition
def test_composition_input_errors():
    e, c, t = (x.detach() for x in _inputs(2, 8, 3, 3, 5, 0.5))
    with pytest.raises(RuntimeError, match=r"centers must have width D=8 \(the channels of "
                                           r"embedding\), got shape \[5, 7\]"):
        torch.ops.snl.cram_fwd(e, c[:, :7], t)
    big = _inputs(1, 8, 2, 2, 257, 0.5)[1].detach()
    with pytest.raises(RuntimeError, match=r"centers must hold 1 to 256 centres"):
        torch.ops.snl.cram_fwd(e, big, t)
    central, assign, compact, dist = torch.ops.snl.cram_fwd(e, c, t)
    with pytest.raises(RuntimeError, match=r"dist must have shape \[18, 5\], got \[18, 4\]"):
        torch.ops.snl.cram_bwd(e, c, t, assign, dist[:, :4], central, assign, compact)


@composition
def test_composition_opcheck():
    """The schema, fake functions and registered autograd agree with the CPU registration."""
    e, c, t = _inputs(2, 16, 2, 3, 5, 0.5)
    torch.library.opcheck(torch.ops.snl.cram_fwd.default, (e, c, t))
    e_cl = e.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.snl.cram_fwd.default, (e_cl, c, t))
    central, assign, compact, dist = torch.ops.snl.cram_fwd(e.detach(), c.detach(), t.detach())
    grads = [torch.randn_like(x) for x in (central, assign, compact)]
    torch.library.opcheck(torch.ops.snl.cram_bwd.default,
                          (e.detach(), c.detach(), t.detach(), assign, dist, *grads))


@composition
def test_composition_eager_path_equals_registered_op(monkeypatch):
    """The CUDA backend's eager path (its C++ kernels below autograd, inside the eager
    Function; snl_kernels/_registration.py) gives the registered op's bits, values and all
    three gradients, never calls the registered op in plain eager mode, runs the kernel alone
    without gradients, and hands the call to the registered op under a dispatch mode."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    kernel_op = importlib.import_module("snl_kernels.cram")._FORWARD_OPS["cuda"]
    e, c, t = _inputs(2, 24, 3, 5, 6, 0.5)
    results = []
    for call in (kernel_op, kernel_op.op):
        out = call(e, c, t)
        results.append([*out, *torch.autograd.grad(sum(o.sum() for o in out[:3]), (e, c, t))])
    assert len(results[0]) == len(results[1]) == 7
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y)
    assert [o.shape for o in kernel_op.leading(e, c, t)] == [o.shape for o in results[0][:3]]

    registered, calls = kernel_op.op, []

    def recording(*args):
        calls.append(args)
        return registered(*args)

    monkeypatch.setattr(kernel_op, "op", recording)
    out = kernel_op(e, c, t)
    assert out[0].grad_fn is not None
    assert calls == []
    with torch.no_grad():
        assert all(o.grad_fn is None for o in kernel_op(e, c, t))
    assert all(o.grad_fn is None for o in kernel_op(*(x.detach() for x in (e, c, t))))
    assert calls == []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recording():
        kernel_op(e, c, t)
    assert "snl.cram_fwd.default" in calls


@composition
def test_composition_jit_trace_records_the_registered_op():
    """The CUDA backend's eager path steps aside under torch.jit.trace (its redispatch runs
    below the tracer), so the trace holds the op and recomputes it for new inputs."""
    import importlib

    kernel_op = importlib.import_module("snl_kernels.cram")._FORWARD_OPS["cuda"]

    def central(e, c, t):
        return kernel_op.leading(e, c, t)[0]

    e, c, t = (x.detach() for x in _inputs(2, 16, 2, 3, 5, 0.5))
    traced = torch.jit.trace(central, (e, c, t), check_trace=False)
    assert "snl::cram_fwd" in str(traced.graph)
    e2, c2, t2 = (x.detach() for x in _inputs(2, 16, 2, 3, 5, 0.5, seed=3))
    assert torch.equal(traced(e2, c2, t2), central(e2, c2, t2))
