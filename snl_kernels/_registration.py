"""Fake implementations and autograd of an op's forward/backward pair, in each kernel backend,
and the eager call path that skips the dispatcher.

The Triton ops are ``torch.library.custom_op`` functions in namespace ``snl_triton``; the CUDA
ops are the extension's ``snl`` ops with the same schemas (``csrc/ops.cpp``), registered here
only where the loaded extension has them. Both get the same fake implementations and the
same autograd formula, built around each backend's own backward op.

Eager path. A call through ``torch.library`` costs tens of microseconds of host time in
eager mode (the dispatcher, then the Python autograd kernel that ``register_autograd``
installs, then the op's Python body): about 60 us per call on this project's CPU against
well under 1 us for the body itself (``benchmarks/bench_host_overhead.py``). So a
:class:`KernelOp` runs a Triton op's Python body directly, inside a plain
``torch.autograd.Function`` built from the *same* ``setup_context`` and backward formula,
whenever the call is plain eager PyTorch: not under ``torch.compile``, not inside a
``TorchDispatchMode`` (fake tensors, ``opcheck``, flop counters), no tensor subclass or
functorch-wrapped tensor among the arguments. Anything else takes the registered op, which
is what compiles, traces and exports. The CUDA backend's ops (C++ kernels with Python
autograd) keep the registered path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _cuda


def _plain(value) -> bool:
    if isinstance(value, torch.Tensor):
        return type(value) is torch.Tensor and not _functorch_wrapped(value)
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return True


def _functorch_wrapped(tensor: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(tensor)) if check is not None else False


def plain_eager(args) -> bool:
    """Whether a call with these arguments is plain eager PyTorch (see the module doc)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(_plain(a) for a in args)


def eager_function(forward: Callable, backward_op: Callable,
                   make_backward: Callable[[Callable], Callable],
                   setup_context: Callable, differentiable: int | None = None) -> Callable:
    """``forward`` (an op's Python body) with the op's autograd, as a plain
    ``torch.autograd.Function``: the same ``setup_context`` and backward formula as the
    registered op, around ``backward_op`` (the backward op's Python body).

    ``differentiable``: how many leading outputs carry gradients (None: all); the others
    (saved statistics, sign bits) are returned beside the Function, not through it, which
    saves autograd's per-output bookkeeping; the formula gets None for their gradients.
    """
    backward = make_backward(backward_op)

    class _Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            ctx.set_materialize_grads(False)
            if differentiable is None:
                return output
            ctx.rest = output[differentiable:]  # handed back beside the Function (call)
            return output[:differentiable]

        @staticmethod
        def backward(ctx, *grads):
            extra = [None] * len(ctx.rest) if differentiable is not None else []
            return backward(ctx, *grads, *extra)

    def call(*inputs):
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in inputs):
            output = _Op.apply(*inputs)
            if differentiable is None:
                return output
            # The outputs' grad_fn is this call's ctx, which holds the other outputs.
            return (*output, *output[0].grad_fn.rest)
        return forward(*inputs)

    return call


class KernelOp:
    """A kernel backend's forward op: ``eager`` (the op's body, with its autograd) for plain
    eager calls, the registered ``op`` otherwise (:func:`plain_eager`)."""

    def __init__(self, op: Callable, eager: Callable | None = None) -> None:
        self.op = op
        self.eager = eager

    def __call__(self, *args):
        if self.eager is not None and plain_eager(args):
            return self.eager(*args)
        return self.op(*args)


def register_kernel_ops(fwd: str, bwd: str, triton_bwd: Callable, fake_fwd: Callable,
                        fake_bwd: Callable, make_backward: Callable[[Callable], Callable],
                        setup_context: Callable,
                        triton_bodies: tuple[Callable, Callable] | None = None,
                        differentiable: int | None = None) -> dict[str, KernelOp]:
    """Register ``fwd``/``bwd`` (op names without namespace) for every kernel backend.

    Args:
        fwd, bwd: the forward and backward op names, e.g. "cram_fwd", "cram_bwd".
        triton_bwd: the Triton backward op (``snl_triton::<bwd>``).
        fake_fwd, fake_bwd: their fake (meta) implementations.
        make_backward: builds the autograd backward from a backend's backward op.
        setup_context: the autograd ``setup_context``.
        triton_bodies: the Python bodies of the Triton forward and backward ops, for the
            eager path (:class:`KernelOp`); None: always the registered op.
        differentiable: leading outputs with gradients, as :func:`eager_function`.

    Returns:
        The forward op of each registered backend: {"triton": ..., "cuda": ...} ("cuda"
        only where the extension has ``snl::<fwd>``).
    """
    backends = {"triton": ("snl_triton", triton_bwd)}
    if _cuda.has_op(fwd):
        backends["cuda"] = ("snl", getattr(torch.ops.snl, bwd).default)
    forward = {}
    for backend, (namespace, bwd_op) in backends.items():
        torch.library.register_fake(f"{namespace}::{fwd}")(fake_fwd)
        torch.library.register_fake(f"{namespace}::{bwd}")(fake_bwd)
        torch.library.register_autograd(f"{namespace}::{fwd}", make_backward(bwd_op),
                                        setup_context=setup_context)
        op = getattr(getattr(torch.ops, namespace), fwd)
        eager = None
        if backend == "triton" and triton_bodies is not None:
            eager = eager_function(*triton_bodies, make_backward, setup_context, differentiable)
        forward[backend] = KernelOp(op, eager)
    return forward
