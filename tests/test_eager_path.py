"""The eager call path of the Triton ops (``snl_kernels/_registration.py``): the same numbers
and gradients as the registered ``torch.library`` ops, and the registered op wherever the
call is not plain eager PyTorch (compile, fake tensors, dispatch modes, subclasses)."""

from __future__ import annotations

import importlib

import pytest
import torch
from support import DEVICE, NO_TRITON, features
from torch.utils._python_dispatch import TorchDispatchMode

import snl_kernels
from snl_kernels._registration import KernelOp, plain_eager

# The op modules (the package's attributes of these names are the functions).
cosine_distances, cram, intra_affinity_loss, inter_affinity_loss = (
    importlib.import_module(f"snl_kernels.{name}") for name in (
        "cosine_distances", "cram", "intra_affinity_loss", "inter_affinity_loss"))

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")


def _grads(outputs, inputs):
    g = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum()
               for o in _flat(outputs) if o.is_floating_point() and o.requires_grad)
    return torch.autograd.grad(loss, inputs)


def _both(kernel_op: KernelOp, args, grad_inputs):
    """Outputs and gradients of the eager path and of the registered op on the same args."""
    results = []
    for call in (kernel_op.eager, kernel_op.op):
        out = call(*args)
        out = out if isinstance(out, tuple) else (out,)
        results.append((out, _grads(out, grad_inputs)))
    return results


def _flat(outputs):
    return [x for o in outputs for x in (o if isinstance(o, list) else (o,))]


def _assert_same(a, b):
    (out_a, grad_a), (out_b, grad_b) = a, b
    out_a, out_b = _flat(out_a), _flat(out_b)
    assert len(out_a) == len(out_b)
    for x, y in zip(out_a, out_b, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(grad_a, grad_b, strict=True):
        assert torch.equal(x, y)


def test_cosine_distances_eager_equals_registered():
    t, s = features((2, 20, 5, 6), requires_grad=True)
    _assert_same(*_both(cosine_distances._FORWARD_OPS["triton"], (t, s), (t, s)))
    # Only the student requires grad (the frozen teacher): the teacher gets none.
    t.requires_grad_(False)
    _assert_same(*_both(cosine_distances._FORWARD_OPS["triton"], (t, s), (s,)))


def test_cram_eager_equals_registered():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 40, 3, 5, generator=g).to(DEVICE).requires_grad_(True)
    c = torch.randn(7, 40, generator=g).to(DEVICE).requires_grad_(True)
    tau = torch.tensor(1.0, device=DEVICE, requires_grad=True)
    _assert_same(*_both(cram._FORWARD_OPS["triton"], (e, c, tau), (e, c, tau)))


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_affinity_eager_equals_registered(distance):
    t, s = features((2, 12, 4, 5), requires_grad=True)
    grams, dot = snl_kernels.precision.intra_plan("triton", t, distance)
    for store in (0, 2):  # (with store: the norms and Grams kept for the backward)
        _assert_same(*_both(intra_affinity_loss._FORWARD_OPS["triton"],
                            (t, s, distance, grams, dot, store), (t, s)))
    t_a, s_a = features((2, 6, 6, 6), seed=1, requires_grad=True)
    t_b, s_b = features((2, 10, 3, 3), seed=2, requires_grad=True)
    dot = snl_kernels.precision.inter_plan("triton", t_a, t_b, distance)
    for store in (0, 1):
        _assert_same(*_both(inter_affinity_loss._FORWARD_OPS["triton"],
                            (t_a, t_b, s_a, s_b, distance, dot, store), (t_a, t_b, s_a, s_b)))


def test_public_eager_call_skips_the_registered_op(monkeypatch):
    kernel_op = cosine_distances._FORWARD_OPS["triton"]

    def registered(*args):
        raise AssertionError("the registered op ran in plain eager mode")

    monkeypatch.setattr(kernel_op, "op", registered)
    t, s = features((1, 8, 3, 3), requires_grad=True)
    out = snl_kernels.cosine_distances(t, s, backend="triton")
    out.pixel.sum().backward()
    assert s.grad is not None
    with torch.no_grad():
        snl_kernels.cosine_distances(t, s, backend="triton")


def test_eager_call_runs_the_body_alone_without_grad_and_the_registered_op_under_transforms(
        monkeypatch):
    """No input requiring grad (or grad mode off): the body alone, no autograd node; a
    functorch transform active: the registered op, even for plain tensors captured from
    outside the transform (the eager Function is of the style functorch rejects)."""
    kernel_op = cosine_distances._FORWARD_OPS["triton"]
    calls = []

    def registered(*args):
        calls.append(args)
        return ()

    monkeypatch.setattr(kernel_op, "op", registered)
    t, s = features((1, 8, 3, 3))
    assert all(out.grad_fn is None for out in kernel_op(t, s))
    s.requires_grad_(True)
    with torch.no_grad():
        assert all(out.grad_fn is None for out in kernel_op(t, s))
    assert kernel_op(t, s)[0].grad_fn is not None
    assert calls == []

    def f(x):
        kernel_op(t, s)
        return x.sum()

    torch.func.grad(f)(torch.ones(2))
    assert len(calls) == 1


class _Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_registered_op_under_dispatch_modes_fake_tensors_and_subclasses():
    t, s = features((1, 8, 3, 3))
    assert plain_eager((t, s, "l2", [t]))
    with _Recording() as mode:
        assert not plain_eager((t, s))
        snl_kernels.cosine_distances(t, s, backend="triton")
    assert any("snl_triton.cosine_distances_fwd" in op for op in mode.ops)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        ft, fs = fake.from_tensor(t), fake.from_tensor(s)
        out = snl_kernels.cosine_distances(ft, fs, backend="triton")
        assert out.pixel.shape == (1, 3, 3)
    # A Parameter dispatches as a plain tensor (CRAM's centres are one); other subclasses do not.
    assert plain_eager((torch.nn.Parameter(t),))

    class Sub(torch.Tensor):
        pass

    assert not plain_eager((t.as_subclass(Sub),))


def test_fullgraph_compile_uses_the_registered_op():
    t, s = features((1, 8, 3, 3), requires_grad=True)
    compiled = torch.compile(lambda a, b: snl_kernels.cosine_distances(a, b, backend="triton")
                             .pixel.sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(t, s)
    ref = snl_kernels.cosine_distances(t, s, backend="triton").pixel.sum()
    assert torch.equal(loss, ref)
    loss.backward()
    assert s.grad is not None


def test_fast_apply_falls_back_to_apply_under_functorch_transforms():
    """fast_apply skips Function.apply's Python wrapper in plain eager calls and takes it while a
    functorch transform is active (torch.func needs the wrapper's path)."""
    from snl_kernels._registration import fast_apply

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    square = fast_apply(Square)
    x = torch.randn(5, dtype=torch.float64)
    assert torch.equal(torch.func.grad(lambda v: square(v).sum())(x), 2 * x)
    leaf = x.clone().requires_grad_(True)
    out = square(leaf)
    assert type(out.grad_fn).__name__ == "SquareBackward"
    out.sum().backward()
    assert torch.equal(leaf.grad, 2 * x)


def test_jit_trace_records_the_registered_op():
    """Under torch.jit.trace the call takes the registered op, which the trace records: a
    trace of the eager path would hold the outputs as constants (the launches are invisible
    to the tracer)."""
    t, s = features((1, 8, 3, 3))

    def pixel(t, s):
        return snl_kernels.cosine_distances(t, s, backend="triton").pixel

    traced = torch.jit.trace(pixel, (t, s), check_trace=False)
    assert "snl_triton::cosine_distances_fwd" in str(traced.graph)
    t2, s2 = features((1, 8, 3, 3), seed=7)
    assert torch.equal(traced(t2, s2), pixel(t2, s2))
