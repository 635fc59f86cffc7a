"""Host programs recorded once per shape and replayed as straight-line code.

A launcher's Python (argument checks, tile choices, stride dictionaries, job lists, the
binder's key per launch) does the same work at every call with the same shapes; for the
fused distillation loss it costs about 1 ms per training step on a 2-core CPU, several
times the kernels' device time. :class:`Programs` runs such a function once per *key* (the
caller's description of everything the function's control flow depends on: shapes,
strides, dtypes, devices, 16-byte alignment of the inputs, flags, settings) while
recording, and later calls with the same key run the recording instead:

- every PyTorch call that makes or changes a tensor (allocations, views, small reductions,
  in-place adds) is kept with its arguments, tensors by the variable that holds them;
- every Triton launch is kept as a direct call of the compiled kernel's C launcher with
  its arguments in order (under the interpreter: Triton's own call with keyword arguments);
- calls that only read metadata fixed by the key (``shape``, ``stride()``, ``dtype``...)
  are dropped: their results are part of the recording.

The recording becomes the source of one Python function (variables ``s0, s1, ...``, each
dropped after its last use), compiled once; replaying it costs the PyTorch calls and the C
launches themselves, nothing of the Python that chose them.

A function cannot be recorded, and always runs as written (the reason is kept, see
:func:`reasons`), when it reads a value that may change between calls with one key (a
tensor's contents, ``data_ptr()`` outside a launch, ``item()``), makes a tensor whose shape
depends on data, or uses a tensor that is neither an input nor made during the call. The
caller's key must hold everything else the function's choices depend on; what it leaves
out is replayed as recorded. ``SNL_REPLAY=0`` turns replaying off; ``SNL_REPLAY=check``
records every call anew and raises :class:`ReplayMismatch` where a recording with the same
key differs (the tests' check of the keys). Launch hooks (profilers), a tool's
``launch.hook`` and a current CUDA device other than the recorded one make a call run as
written.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import _env

ENV_VAR = "SNL_REPLAY"

#: Calls whose non-tensor results are fixed by the key (dropped from the recording).
METADATA = frozenset({
    "shape", "size", "stride", "dim", "ndim", "numel", "nelement", "dtype", "device",
    "is_contiguous", "requires_grad", "storage_offset", "element_size", "itemsize",
    "__len__", "is_cuda", "is_cpu", "layout", "is_floating_point", "is_complex", "is_leaf",
    "is_sparse", "is_quantized", "is_meta", "is_nested", "names", "_is_view",
})
#: Calls whose result's shape depends on the data.
DATA_SHAPED = frozenset({"nonzero", "unique", "unique_consecutive", "masked_select",
                         "argwhere", "nonzero_static"})
#: Programs kept per :class:`Programs` before it starts again.
MAX_PROGRAMS = 64


class ReplayMismatch(AssertionError):
    """``SNL_REPLAY=check``: a call recorded differently from the recording of its key."""


class _NotReplayable(Exception):
    pass


_UNREPLAYABLE = object()
_all: weakref.WeakSet = weakref.WeakSet()
_local = threading.local()
_reasons: dict[str, str] = {}


def mode() -> str:
    """"on" (default), "off" (``SNL_REPLAY=0``) or "check" (``SNL_REPLAY=check``)."""
    value = _env.get(ENV_VAR)
    if not value or value == "1":
        return "on"
    if value == "0":
        return "off"
    if value == "check":
        return "check"
    raise ValueError(f"{ENV_VAR} must be 0, 1 or check (or unset), got {value!r}")


def recorder():
    """The recording in progress on this thread, or None (read by the launcher)."""
    return getattr(_local, "recording", None)


class _NoLaunches:
    """Stands in for a recording while host code runs on fake tensors: launches do nothing."""

    @staticmethod
    def launch(fn, grid, args, options, bound) -> None:
        return None


@contextlib.contextmanager
def no_launches():
    """Kernel launches on this thread do nothing inside the block: host code run on fake
    tensors (a registered op's fake implementation) gives its outputs' metadata without a
    kernel. No host program is recorded or replayed inside it."""
    previous = getattr(_local, "recording", None)
    _local.recording = _NoLaunches
    try:
        yield
    finally:
        _local.recording = previous


def reasons() -> dict[str, str]:
    """Per :class:`Programs` name, why its last refused recording could not be replayed."""
    return dict(_reasons)


def clear_all() -> None:
    """Forget every recording (the next call of each key records again)."""
    for programs in list(_all):
        programs.clear()


def _name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property's getter: the property's name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _Recording(TorchFunctionMode):
    """Records the calls of one run as the lines of a function's body."""

    def __init__(self, inputs: Sequence[Any]):
        super().__init__()
        self.vars: dict[int, str] = {}
        self.keep: list = []  # every tensor seen, so that no id is reused while recording
        self.lines: list[tuple[str, tuple[str, ...]]] = []  # (line, variables it reads)
        self.consts: list = []
        self.failed: str | None = None
        self.quiet = 0
        self.inputs = len(inputs)
        self.device = None
        for i, x in enumerate(inputs):
            if isinstance(x, Tensor):
                self._bind(x, f"s{i}")
        self.count = len(inputs)

    def _bind(self, t: Tensor, name: str) -> None:
        self.vars[id(t)] = name
        self.keep.append(t)

    def _new(self, t: Tensor) -> str:
        name = f"s{self.count}"
        self.count += 1
        self._bind(t, name)
        return name

    def const(self, value) -> str:
        for i, known in enumerate(self.consts):
            if known is value:
                return f"c{i}"
        self.consts.append(value)
        return f"c{len(self.consts) - 1}"

    def source(self, x, reads: list[str]) -> str:
        """Source text of argument ``x`` (variables read are appended to ``reads``)."""
        if isinstance(x, Tensor):
            name = self.vars.get(id(x))
            if name is None:
                raise _NotReplayable("a tensor that is neither an input nor made in the call")
            reads.append(name)
            return name
        if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
            inner = ", ".join(self.source(item, reads) for item in x)
            if isinstance(x, list):
                return f"[{inner}]"
            if type(x) is not tuple:
                raise _NotReplayable(f"an argument of type {type(x).__name__}")
            return f"({inner},)" if x else "()"
        if x is None or (isinstance(x, (bool, int, str)) and type(x) in (bool, int, str)):
            return repr(x)
        return self.const(x)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet or self.failed is not None:
            return out
        try:
            self._record(func, args, kwargs, out)
        except _NotReplayable as why:
            self.failed = f"{_name(func)}: {why}"
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = _name(func)
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if out is not None and not tensors:
            if name in METADATA:
                return
            raise _NotReplayable(f"returns a {type(out).__name__} that may differ between calls")
        if name in DATA_SHAPED or (name == "__getitem__" and _has_tensor(args[1:])):
            raise _NotReplayable("the result's shape depends on the data")
        if len(tensors) != len(leaves):
            raise _NotReplayable("returns tensors mixed with other values")
        reads: list[str] = []
        call = ", ".join([*(self.source(a, reads) for a in args),
                          *(f"{k}={self.source(v, reads)}" for k, v in kwargs.items())])
        call = f"{self.const(func)}({call})"
        if out is None or (isinstance(out, Tensor) and id(out) in self.vars):
            self.lines.append((call, tuple(reads)))  # in place, or returns an input
            return
        targets = [self.vars[id(t)] if id(t) in self.vars else self._new(t) for t in tensors]
        if isinstance(out, Tensor):
            self.lines.append((f"{targets[0]} = {call}", tuple(reads)))
        else:
            unpack = "".join(f"{t}, " for t in targets) or "_"
            self.lines.append((f"{unpack}= {call}", tuple(reads)))

    def launch(self, fn, grid, args: dict, options: dict, bound) -> None:
        """Launch through ``bound`` (the pre-bound launcher) and record the launch."""
        self.quiet += 1
        try:
            entry = bound(fn, grid, args, options)
        finally:
            self.quiet -= 1
        if self.failed is not None:
            return
        try:
            reads: list[str] = []
            if entry is None:  # the interpreter: Triton's own call, by keyword
                call = ", ".join([*(f"{k}={self.source(v, reads)}" for k, v in args.items()),
                                  *(f"{k}={self.source(v, reads)}" for k, v in options.items())])
                line = f"{self.const(fn)}[{self.const(tuple(grid))}]({call})"
            else:
                (run, function, metadata), values, device = entry
                if self.device is None:
                    self.device = device
                elif device != self.device:
                    raise _NotReplayable("launches on two devices")
                size = len(grid)
                dims = ", ".join(str(int(grid[i]) if i < size else 1) for i in range(3))
                arguments = ", ".join(self.source(v, reads) for v in values)
                line = (f"{self.const(run)}({dims}, stream, {self.const(function)}, "
                        f"{self.const(metadata)}, None, None, None, {arguments})")
            self.lines.append((line, tuple(reads)))
        except _NotReplayable as why:
            self.failed = f"{fn.__name__}: {why}"

    def program(self, outputs: list) -> tuple[Callable, str]:
        """The recorded function: ``program(inputs) -> output leaves`` (None where the
        current CUDA device is not the recorded one), and its source."""
        reads: list[str] = []
        returned = "[" + ", ".join(self.source(x, reads) for x in outputs) + "]"
        last: dict[str, int] = {}
        for i, (_, used) in enumerate(self.lines):
            for v in used:
                last[v] = i
        kept = set(reads)
        body = []
        if self.device is not None:
            body += [f"if device() != {self.device!r}:", "    return None",
                     "stream = current_stream(" f"{self.device!r})"]
        if self.inputs:
            body.append("".join(f"s{i}, " for i in range(self.inputs)) + "= inputs")
        for i, (line, used) in enumerate(self.lines):
            body.append(line)
            dead = sorted({v for v in used if last[v] == i and v not in kept
                           and int(v[1:]) >= self.inputs})
            if dead:
                body.append("del " + ", ".join(dead))
        body.append(f"return {returned}")
        source = "def program(inputs):\n" + "".join(f"    {line}\n" for line in body)
        scope = {f"c{i}": value for i, value in enumerate(self.consts)}
        if self.device is not None:
            from triton.runtime.driver import driver

            scope["device"] = driver.active.get_current_device
            scope["current_stream"] = driver.active.get_current_stream
        exec(compile(source, "<snl_kernels replay>", "exec"), scope)
        return scope["program"], source


def _same(a: list, b: list) -> bool:
    """Whether two recordings' constants are the same objects or equal values."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x is y:
            continue
        try:
            if type(x) is not type(y) or not bool(x == y):
                return False
        except Exception:
            return False
    return True


def _has_tensor(x) -> bool:
    if isinstance(x, Tensor):
        return True
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(item) for item in x)
    return False


class Programs:
    """One host function's recordings, by key.

    ``programs(key, fn, inputs, *args)`` returns ``(leaves, spec)``: the leaves of what
    ``fn(inputs, *args)`` returns, flattened by ``torch.utils._pytree`` (rebuild with
    ``pytree.tree_unflatten(leaves, spec)``). ``inputs`` is a sequence holding every tensor
    the function reads that was not made during the call (other items are taken as they are);
    ``args`` are fixed by the key. ``key`` None runs ``fn`` as written, unrecorded.
    """

    def __init__(self, name: str):
        self.name = name
        self._programs: dict[Hashable, Any] = {}
        _all.add(self)

    def __len__(self) -> int:
        return len(self._programs)

    def clear(self) -> None:
        self._programs.clear()

    def __call__(self, key: Hashable | None, fn: Callable, inputs: Sequence[Any],
                 *args: Any) -> tuple[list, Any]:
        how = mode() if key is not None else "off"
        if how == "off" or not _replayable():
            return pytree.tree_flatten(fn(inputs, *args))
        found = self._programs.get(key)
        if found is not None and how == "on":
            if found is _UNREPLAYABLE:
                return pytree.tree_flatten(fn(inputs, *args))
            program, _, spec, _ = found
            leaves = program(inputs)
            if leaves is not None:
                return leaves, spec
            return pytree.tree_flatten(fn(inputs, *args))
        return self._record(key, found, fn, inputs, args)

    def _record(self, key, found, fn, inputs, args):
        recording = _Recording(inputs)
        _local.recording = recording
        try:
            with recording:
                result = fn(inputs, *args)
        finally:
            _local.recording = None
        leaves, spec = pytree.tree_flatten(result)
        entry: Any = _UNREPLAYABLE
        if recording.failed is None:
            try:
                program, source = recording.program(leaves)
                entry = (program, source, spec, recording.consts)
            except _NotReplayable as why:
                recording.failed = f"outputs: {why}"
        if recording.failed is not None:
            _reasons[self.name] = recording.failed
        if found is not None:  # SNL_REPLAY=check: the same key must record the same calls
            same = (found is _UNREPLAYABLE and entry is _UNREPLAYABLE) or (
                found is not _UNREPLAYABLE and entry is not _UNREPLAYABLE
                and found[1] == entry[1] and found[2] == entry[2]
                and _same(found[3], entry[3]))
            if not same:
                raise ReplayMismatch(f"{self.name}: two calls with the key {key!r} recorded "
                                     "different programs; the key misses what tells them "
                                     "apart")
            return leaves, spec
        if len(self._programs) >= MAX_PROGRAMS:
            self._programs.clear()
        self._programs[key] = entry
        return leaves, spec


def _replayable() -> bool:
    """No launch hook (tools, profilers) is installed, and launches are not switched off
    (:func:`no_launches`): launches may skip Triton's path."""
    from ._triton import launch

    return (launch.hook is None and getattr(_local, "recording", None) is None
            and not launch.hooked())
