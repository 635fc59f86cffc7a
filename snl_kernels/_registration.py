"""Fake implementations and autograd of an op's forward/backward pair, in each kernel backend,
and the eager call path that skips the dispatcher.

The Triton ops are ``torch.library.custom_op`` functions in namespace ``snl_triton``; the CUDA
ops are the extension's ``snl`` ops with the same schemas (``csrc/ops.cpp``), registered here
only where the loaded extension has them. Both get the same fake implementations and the
same autograd formula, built around each backend's own backward op.

Eager path. A call through ``torch.library`` costs tens of microseconds of host time in
eager mode (the dispatcher, then the Python autograd kernel that ``register_autograd``
installs, then the op's Python body): 25-35 us per call with autograd on this project's
CPU against well under 1 us for the body itself (``benchmarks/bench_host_overhead.py``). So
a :class:`KernelOp` runs a Triton op's Python body directly, inside a plain
``torch.autograd.Function`` built from the *same* ``setup_context`` and backward formula,
whenever the call is plain eager PyTorch: not under ``torch.compile`` or ``torch.jit.trace``,
not inside a ``TorchDispatchMode`` (fake tensors, ``opcheck``, flop counters), no functorch
transform (``torch.func``) active, no tensor subclass (a ``Parameter`` counts as plain) or
functorch-wrapped tensor among the arguments. Anything else takes the registered op, which
is what compiles, traces and exports. The Function is applied through the C++ ``apply``,
which skips ``Function.apply``'s Python wrapper, and only where an input requires grad with
grad mode on; otherwise the body runs alone. For the CUDA backend the body is the
extension's C++ op called below autograd (:func:`below_autograd`): through the dispatcher
its registered Python autograd kernel costs about 17 us per call with autograd on this CPU
(``bench_host_overhead``'s CUDA-path providers).
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


_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)

_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active
_tracing = torch._C._get_tracing_state  # torch.jit.trace: None when not tracing
_grad_enabled = torch.is_grad_enabled


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
    if (_is_compiling() or _dispatch_modes() > 0 or _transforms_active()
            or _tracing() is not None):
        return False
    # With no functorch transform active no argument can be functorch-wrapped (those tensors
    # live inside a transform), so a tensor needs only its type checked: this runs on every
    # op call.
    return all(type(value) in _PLAIN_TYPES or _plain(value) for value in args)


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


def below_autograd(op: torch._ops.OpOverload) -> Callable:
    """A C++ op's backend kernel (CUDA, or CPU where it has one), called by redispatch below
    the autograd keys: what the registered op runs after its autograd kernel, without that
    kernel (a Python function from ``register_autograd``, run on every call through the
    dispatcher). The device comes from the first argument, a tensor; every argument is
    passed positionally. For the eager path only, where :class:`KernelOp`'s checks hold."""
    redispatch = op.redispatch

    def kernel(first, *rest):
        return redispatch(_CUDA_KEYS if first.is_cuda else _CPU_KEYS, first, *rest)

    return kernel


class _Inputs:
    """What the backward formula sees of an eager call's ctx: every attribute of ``ctx``, with
    ``needs_input_grad`` of the op's inputs only (not of the output holder before them)."""

    __slots__ = ("_ctx", "needs_input_grad")

    def __init__(self, ctx) -> None:
        self._ctx = ctx
        self.needs_input_grad = ctx.needs_input_grad[1:]

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def eager_function(forward: Callable, backward_op: Callable,
                   make_backward: Callable[[Callable], Callable],
                   setup_context: Callable, differentiable: int | None = None) -> Callable:
    """``forward`` (an op's Python body) with the op's autograd, as a plain
    ``torch.autograd.Function``: the same ``setup_context`` and backward formula as the
    registered op, around ``backward_op`` (the backward op's Python body), applied through
    the C++ ``apply`` (as :func:`fast_apply`; :class:`KernelOp` calls it only in plain eager
    mode, where no functorch transform is active).

    ``differentiable``: how many leading outputs carry gradients (None: all); the others
    (saved statistics, sign bits) are returned beside the Function, not through it, which
    saves autograd's per-output bookkeeping; the formula gets None for their gradients.
    """
    backward = make_backward(backward_op)
    # The outputs kept out of the Function get None gradients; their number is the op's,
    # the same on every call (kept here rather than on each call's ctx).
    rest: list = []

    class _Op(torch.autograd.Function):
        # A Function in the older style (``forward`` takes ``ctx``), which saves the separate
        # ``setup_context`` call from C++ (functorch transforms need the newer style; they
        # take the registered op). The first argument is a list that receives the body's
        # whole output, so that the caller sees the outputs kept out of the Function.
        @staticmethod
        def forward(ctx, held, *inputs):
            output = forward(*inputs)
            held.append(output)
            setup_context(ctx, inputs, output)
            ctx.set_materialize_grads(False)
            if differentiable is None:
                return output
            if not rest:
                rest.extend([None] * (len(output) - differentiable))
            return output[:differentiable]

        @staticmethod
        def backward(ctx, *grads):
            return (None, *backward(_Inputs(ctx), *grads, *rest))

    apply = super(torch.autograd.Function, _Op).apply

    def call(*inputs):
        held: list = []
        output = apply(held, *inputs)
        if differentiable is None:
            return output
        return (*output, *held[0][differentiable:])

    call.apply = apply  # type: ignore[attr-defined]  # KernelOp inlines call
    call.differentiable = differentiable  # type: ignore[attr-defined]
    return call


class KernelOp:
    """A kernel backend's forward op: for plain eager calls (:func:`plain_eager`) ``eager``
    (the op's body inside its autograd Function) where an input requires grad and grad mode
    is on, else ``body`` (the op's body alone); the registered ``op`` otherwise.

    Calling it returns every output of the op; :meth:`leading` only the outputs that carry
    gradients (an eager_function's ``differentiable``), which saves joining the others
    back on where the caller drops them."""

    def __init__(self, op: Callable, eager: Callable | None = None,
                 body: Callable | None = None) -> None:
        self.op = op
        self.eager = eager
        self.body = body if body is not None else eager
        # An eager_function's Function, applied here rather than through its wrapper.
        self.apply = getattr(eager, "apply", None)
        self.differentiable = getattr(eager, "differentiable", None)

    def __call__(self, *args):
        return self._call(args, True)

    def leading(self, *args):
        """The op's leading ``differentiable`` outputs (all of them where that is None)."""
        return self._call(args, False)

    def _call(self, args, whole: bool):
        # plain_eager's mode test, inlined (this runs on every op call).
        if (self.eager is None or _is_compiling() or _dispatch_modes()
                or _transforms_active() or _tracing() is not None):
            output = self.op(*args)
        else:
            # plain_eager's argument test and the requires-grad test in one pass (this runs
            # on every op call).
            grad = False
            for value in args:
                if type(value) in _PLAIN_TYPES:
                    if value.requires_grad:
                        grad = True
                elif not _plain(value):
                    grad = None
                    break
            if grad is None:
                output = self.op(*args)
            elif not grad or not _grad_enabled():
                output = self.body(*args)
            elif self.apply is None:
                output = self.eager(*args)
            else:
                held: list = []  # eager_function's call, inlined (this runs on every op call)
                output = self.apply(held, *args)
                if whole and self.differentiable is not None:
                    return (*output, *held[0][self.differentiable:])
                return output
        if whole or self.differentiable is None:
            return output
        return output[:self.differentiable]


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
            eager path (:class:`KernelOp`); None: the Triton op always takes the registered
            op. The CUDA ops' eager bodies are their kernels below autograd.
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
        if backend == "cuda":
            forward[backend] = cuda_kernel_op(op, bwd_op, make_backward, setup_context,
                                              differentiable)
        elif triton_bodies is not None:
            eager = eager_function(*triton_bodies, make_backward, setup_context, differentiable)
            forward[backend] = KernelOp(op, eager, triton_bodies[0])
        else:
            forward[backend] = KernelOp(op)
    return forward


def cuda_kernel_op(op, bwd_op, make_backward: Callable[[Callable], Callable],
                   setup_context: Callable, differentiable: int | None = None) -> KernelOp:
    """The CUDA backend's forward op ``op`` (the extension's op, e.g.
    ``torch.ops.snl.cram_fwd``) with its eager path: the forward and backward (``bwd_op``,
    an overload) kernels below autograd, inside :func:`eager_function`'s Function."""
    forward = below_autograd(op.default)
    eager = eager_function(forward, below_autograd(bwd_op), make_backward, setup_context,
                           differentiable)
    return KernelOp(op, eager, forward)
