"""Bytes and FLOPs of every launch of an op, counted on the CPU under Triton's interpreter.

Run in a process with ``TRITON_INTERPRET=1`` and ``SNL_TRITON_CONFIG=gpu`` (the tiles, blocks
and warps of a GPU launch). While :func:`count` runs an op:

- every Triton launch is a record: its kernel, grid, the arguments the JIT binds, the global
  bytes its masked-in loads and stores *request* (one element size per active lane, repeats
  included) and the *distinct* bytes they touch (the union of the addresses read, plus that
  of the addresses written), the FLOPs of its ``tl.dot`` products (2 M N K each: the tensor
  cores' work where the compiled kernel has matrix instructions) and of its elementwise
  floating-point arithmetic (add, sub, mul, div: 1 per lane; fma: 2);
- every ATen op that moves data outside a kernel (the op's own PyTorch work: allocation
  fills, partial-sum reductions, autograd's gradient accumulation) is a record of kind
  "torch": the bytes of its tensor inputs and outputs (views and allocations move none; a
  filled tensor made like another, ``new_zeros`` or ``zeros_like``, reads nothing), and
  2 M N K for matrix products. An op whose output is a 0-dim tensor is a record even when
  it moves no counted bytes (scalars count none): on a GPU it is a launch all the same.

Nothing here models caches: distinct bytes are what a launch must move at least once, with
an empty L2, and requested bytes what it asks the memory system for.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Address lists kept per launch before they are folded into their unique set.
_COMPACT_AT = 1 << 24


@dataclass
class Launch:
    """One launch (a Triton kernel or an ATen op) and what it moves and computes."""

    kernel: str
    kind: str = "triton"  # "triton" or "torch"
    grid: tuple[int, int, int] = (1, 1, 1)
    args: int = 0  # arguments the JIT binds (Triton) / tensor arguments (torch)
    read_requested: int = 0
    write_requested: int = 0
    read_distinct: int = 0
    write_distinct: int = 0
    dot_flops: float = 0.0
    fma_flops: float = 0.0

    @property
    def requested(self) -> int:
        return self.read_requested + self.write_requested

    @property
    def distinct(self) -> int:
        return self.read_distinct + self.write_distinct

    def scaled(self, factor: float) -> Launch:
        """This launch's counts times ``factor`` (the grid stays)."""
        out = Launch(**asdict(self))
        for name in ("read_requested", "write_requested", "read_distinct", "write_distinct"):
            setattr(out, name, round(getattr(self, name) * factor))
        out.dot_flops, out.fma_flops = self.dot_flops * factor, self.fma_flops * factor
        return out


class _Addresses:
    """Union of (address, element size) pairs, folded into sorted unique arrays as it grows."""

    def __init__(self) -> None:
        self.pending: dict[int, list[np.ndarray]] = {}
        self.sizes: dict[int, int] = {}
        self.unique: dict[int, np.ndarray] = {}
        self.requested = 0

    def add(self, addresses: np.ndarray, itemsize: int) -> None:
        self.requested += addresses.size * itemsize
        self.pending.setdefault(itemsize, []).append(addresses.ravel())
        self.sizes[itemsize] = self.sizes.get(itemsize, 0) + addresses.size
        # Folded when the pending addresses outnumber both the threshold and the unique set
        # already folded (folding at a fixed size only was quadratic once the unique set
        # passed it: every later add folded it again).
        unique = self.unique.get(itemsize)
        if self.sizes[itemsize] > max(_COMPACT_AT, 0 if unique is None else unique.size):
            self._fold(itemsize)

    def _fold(self, itemsize: int) -> None:
        parts = self.pending.pop(itemsize, [])
        if itemsize in self.unique:
            parts.append(self.unique[itemsize])
        self.unique[itemsize] = np.unique(np.concatenate(parts)) if parts else np.empty(0)
        self.sizes[itemsize] = 0  # pending addresses since the fold

    def distinct(self) -> int:
        for itemsize in list(self.pending):
            self._fold(itemsize)
        return sum(u.size * itemsize for itemsize, u in self.unique.items())


class _Recorder:
    """The launch being counted (None between launches) and the finished ones."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.current: Launch | None = None
        self.reads = self.writes = None

    def start(self, kernel: str, args: int) -> None:
        self.current = Launch(kernel=kernel, args=args)
        self.reads, self.writes = _Addresses(), _Addresses()

    def finish(self, grid) -> None:
        launch = self.current
        launch.grid = tuple(int(g) for g in grid)
        launch.read_requested, launch.read_distinct = self.reads.requested, self.reads.distinct()
        launch.write_requested, launch.write_distinct = (self.writes.requested,
                                                         self.writes.distinct())
        self.launches.append(launch)
        self.current = self.reads = self.writes = None


_RECORDER: _Recorder | None = None
_INSTALLED = False


def _install() -> None:
    """Wrap the interpreter's launch, memory, dot and float arithmetic (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("snl_kernels.perf.counting needs TRITON_INTERPRET=1 (set before "
                           "Triton is imported): it counts under Triton's interpreter")
    from triton.runtime import interpreter as interp

    _speed_up_nested_calls(interp)
    builder = interp.InterpreterBuilder
    run, load, store = (interp.InterpretedFunction.run, builder.create_masked_load,
                        builder.create_masked_store)

    def counted_run(self, *args, grid, warmup, **kwargs):
        if _RECORDER is None or warmup:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        _RECORDER.start(self.fn.__name__, len(self.arg_names))
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            _RECORDER.finish(interp.interpreter_builder.grid_dim)

    def note(kind, ptrs, mask):  # the masked-in lanes' addresses into reads or writes
        if _RECORDER is not None and _RECORDER.current is not None:
            itemsize = interp._get_np_dtype(ptrs.get_element_ty()).itemsize
            getattr(_RECORDER, kind).add(
                ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)], itemsize)

    def counted_load(self, ptrs, mask, other, *rest):
        note("reads", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def counted_store(self, ptrs, value, mask, *rest):
        note("writes", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    interp.InterpretedFunction.run = counted_run
    builder.create_masked_load = counted_load
    builder.create_masked_store = counted_store
    _wrap_arithmetic(builder)
    _INSTALLED = True


def _wrap_arithmetic(builder) -> None:
    dot = builder.create_dot

    def counted_dot(self, a, b, d, *rest):
        out = dot(self, a, b, d, *rest)
        if _RECORDER is not None and _RECORDER.current is not None:
            k = a.data.shape[-1]
            _RECORDER.current.dot_flops += 2.0 * out.data.size * k
        return out

    builder.create_dot = counted_dot
    for name, per_lane in (("create_fadd", 1), ("create_fsub", 1), ("create_fmul", 1),
                           ("create_fdiv", 1), ("create_precise_divf", 1), ("create_fma", 2)):
        real = getattr(builder, name)

        def counted(self, *operands, real=real, per_lane=per_lane):
            out = real(self, *operands)
            if _RECORDER is not None and _RECORDER.current is not None:
                _RECORDER.current.fma_flops += per_lane * out.data.size
            return out

        setattr(builder, name, counted)


def _speed_up_nested_calls(interp) -> None:
    """Skip the interpreter's re-patching of ``triton.language`` at every nested
    ``@triton.jit`` call. A launch patches the language's builtins once; each nested call
    scans the modules again (``inspect.getmembers``) and finds them already patched, so the
    scan changes nothing: here it is skipped after one look at a known builtin (the count of
    a whole op drops by about a third; the semantics are unchanged)."""
    import triton.language as tl

    builtins: dict[int, list] = {}
    patch_attr = interp._patch_attr

    def patch_builtin(pkg, builder, scope):
        names = builtins.get(id(pkg))
        if names is None:
            names = builtins[id(pkg)] = [(n, m) for n, m in inspect.getmembers(pkg)
                                         if tl.core.is_builtin(m)]
        if not names or not tl.core.is_builtin(getattr(pkg, names[0][0])):
            return  # patched by the launch around this call: nothing to do
        for name, member in names:
            patch_attr(pkg, name, member, builder, scope)

    interp._patch_builtin = patch_builtin


# ------------------------------------------------------------------ PyTorch's own work

#: ATen ops that move no data (allocations, views, metadata).
_FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
         "alias", "lift_fresh", "_local_scalar_dense", "set_", "resize_", "is_same_size",
         "_has_compatible_shallow_copy_type", "_to_copy_meta")
#: In-place ATen ops that overwrite their first argument without reading it.
_OVERWRITES = ("fill_", "zero_", "copy_")
#: ATen ops that make a filled tensor like their tensor argument without reading it (only
#: its shape, dtype and device): they write their output only.
_FACTORIES = ("new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like")
_MATMULS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}


class _TorchWork(TorchDispatchMode):
    """Records every ATen op that moves data as a "torch" launch of the recorder."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        # Inside a launch, ATen ops are the interpreter's own copies of the arguments; a
        # custom op's launches are counted by the interpreter's hooks.
        if (_RECORDER is None or _RECORDER.current is not None or func.is_view
                or name in _FREE or func.namespace != "aten"):
            return out
        tensors = [t for t in _flat((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        launch = Launch(kernel=f"aten.{name}", kind="torch", args=len(tensors))
        if name in _OVERWRITES:  # the tensor written in place is not read
            tensors = tensors[1:]
        elif name in _FACTORIES:  # the tensor argument gives a shape, nothing is read
            tensors = []
        launch.read_requested = launch.read_distinct = sum(_nbytes(t) for t in tensors)
        launch.write_requested = launch.write_distinct = sum(_nbytes(t) for t in outs)
        if name in _MATMULS:
            a, b = (args[i] for i in _MATMULS[name])
            launch.dot_flops = 2.0 * a.numel() * b.shape[-1]
        elif launch.write_requested:
            launch.fma_flops = float(max(t.numel() for t in outs))
        # An op on 0-dim tensors moves no counted bytes but is still a kernel launch on
        # a GPU (a scalar add, a division of an upstream gradient, a 0-dim fill).
        if launch.requested or any(t.dim() == 0 for t in outs):
            _RECORDER.launches.append(launch)
        return out


def _flat(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    else:
        yield value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() if t.dim() else 0  # scalars: a register's worth


def count(run) -> list[Launch]:
    """Run ``run()`` (an op's forward and backward) and return its launches in order."""
    global _RECORDER
    _install()
    from .. import _registration

    _RECORDER = _Recorder()
    # The eager path steps aside under a dispatch mode (it takes the registered op); the
    # count wants the path a user's eager call takes, so the mode is hidden from that test.
    real_modes = getattr(_registration, "_dispatch_modes", None)
    real_torch = _registration.torch
    if real_modes is not None:
        _registration._dispatch_modes = lambda: 0
    else:  # older trees asked torch._C directly
        _registration.torch = _TorchWithoutModes(real_torch)
    try:
        with _TorchWork():
            run()
        return _RECORDER.launches
    finally:
        if real_modes is not None:
            _registration._dispatch_modes = real_modes
        _registration.torch = real_torch
        _RECORDER = None


class _TorchWithoutModes:
    """``torch`` as one module sees it, with no dispatch mode on the stack (for the eager
    path's test in trees older than ``_registration._dispatch_modes``)."""

    def __init__(self, torch_module):
        self._torch = torch_module
        self._C = _CWithoutModes(torch_module._C)

    def __getattr__(self, name):
        return getattr(self._torch, name)


class _CWithoutModes:
    def __init__(self, c_module):
        self._c = c_module

    @staticmethod
    def _len_torch_dispatch_stack() -> int:
        return 0

    def __getattr__(self, name):
        return getattr(self._c, name)
