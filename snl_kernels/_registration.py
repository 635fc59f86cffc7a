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
``TorchDispatchMode`` (fake tensors, ``opcheck``, flop counters), no tensor subclass (a
``Parameter`` counts as plain) or functorch-wrapped tensor among the arguments. Anything
else takes the registered op, which is what compiles, traces and exports. The Function is
applied through :func:`fast_apply`, which skips ``Function.apply``'s Python wrapper. The
CUDA backend's ops (C++ kernels with Python autograd) keep the registered path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _cuda

_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
_dispatch_modes = torch._C._len_torch_dispatch_stack
#: Tensor types the eager path takes: plain tensors and parameters (a Parameter disables
#: ``__torch_function__``, so it dispatches as a plain tensor).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(value) -> bool:
    if type(value) in _PLAIN_TYPES:
        return _is_wrapped is None or not _is_wrapped(value)
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return True


def plain_eager(args) -> bool:
    """Whether a call with these arguments is plain eager PyTorch (see the module doc)."""
    if torch.compiler.is_compiling() or _dispatch_modes() > 0:
        return False
    return all(_plain(a) for a in args)


def fast_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function.apply`` without its Python wrapper, for plain eager calls.

    ``torch.autograd.Function.apply`` is a Python classmethod around the C++ ``apply``: it
    binds default arguments (for a ``setup_context`` Function) and routes calls under
    functorch transforms (``torch.func``) to their own path. Neither applies to a call whose
    arguments :func:`plain_eager` accepted and that passes every argument positionally, and
    the wrapper alone costs more host time than the library's whole call path (about 35 of
    40 us for a ``setup_context`` Function on this project's CPU; ``bench_host_overhead``).
    The returned callable goes to the C++ ``apply`` directly, and back to ``function.apply``
    while a functorch transform is active.
    """
    direct = super(torch.autograd.Function, function).apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if transforms_active():
            return function.apply(*args)
        return direct(*args)

    return apply


def _any_requires_grad(inputs) -> bool:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            return True
    return False


class _Inputs:
    """What the backward formula sees of an eager call's ctx: every attribute of ``ctx``, with
    ``needs_input_grad`` of the op's inputs only (not of the output holder after them)."""

    __slots__ = ("_ctx", "needs_input_grad")

    def __init__(self, ctx) -> None:
        self._ctx = ctx
        self.needs_input_grad = ctx.needs_input_grad[:-1]

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def eager_function(forward: Callable, backward_op: Callable,
                   make_backward: Callable[[Callable], Callable],
                   setup_context: Callable, differentiable: int | None = None) -> Callable:
    """``forward`` (an op's Python body) with the op's autograd, as a plain
    ``torch.autograd.Function``: the same ``setup_context`` and backward formula as the
    registered op, around ``backward_op`` (the backward op's Python body), applied with
    :func:`fast_apply`.

    ``differentiable``: how many leading outputs carry gradients (None: all); the others
    (saved statistics, sign bits) are returned beside the Function, not through it, which
    saves autograd's per-output bookkeeping; the formula gets None for their gradients.
    """
    backward = make_backward(backward_op)

    class _Op(torch.autograd.Function):
        # The last argument is a list that receives the body's whole output, so that
        # setup_context and the caller see the outputs kept out of the Function.
        @staticmethod
        def forward(*args):
            output = forward(*args[:-1])
            args[-1].append(output)
            return output if differentiable is None else output[:differentiable]

        @staticmethod
        def setup_context(ctx, args, _output):
            output = args[-1][0]
            setup_context(ctx, args[:-1], output)
            ctx.set_materialize_grads(False)
            ctx.rest = 0 if differentiable is None else len(output) - differentiable

        @staticmethod
        def backward(ctx, *grads):
            return (*backward(_Inputs(ctx), *grads, *([None] * ctx.rest)), None)

    apply = fast_apply(_Op)

    def call(*inputs):
        if torch.is_grad_enabled() and _any_requires_grad(inputs):
            held: list = []
            output = apply(*inputs, held)
            if differentiable is None:
                return output
            return (*output, *held[0][differentiable:])
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
