"""Pre-bound launches: a kernel's compiled specialisation found by one dict lookup.

``kernel[grid](**args)`` goes through Triton's ``JITFunction.run`` at every call: its binder
specialises each argument (type, 16-byte alignment of pointers, integers equal to 1 or
divisible by 16), builds a cache key from the result, looks the compiled kernel up and then
calls the C launcher. For the grouped kernels (up to 187 arguments) that costs 140-250 us
of host time per launch on a 2-core CPU, more than the device time of most of them.

:func:`launch` does the binder's work once per specialisation. Its key holds, per
argument in the kernel's parameter order, a tensor's dtype and whether its address is a
multiple of 16, an integer's or a constexpr's value itself, and only the type of a float
that is not a constexpr (what the binder specialises on, or finer: integers are keyed by
value, so a key never covers two of Triton's specialisations). The first call with a key goes through
``JITFunction.run`` (which compiles or finds the kernel and launches it) and keeps the
compiled kernel's launcher, function handle and metadata; later calls with the same key
call the launcher directly with the current stream. Under the interpreter, with a launch
hook installed (profilers add to ``knobs.runtime.launch_enter_hook``), or when a tool routes
launches through :data:`hook`, every call takes the full path.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import Tensor

from .. import _replay

#: Set by tools that must see every launch (the performance model's recorder):
#: ``hook(fn, grid, args, options)`` runs instead of the launch.
hook = None

#: Keys are at most this many per process before the cache starts again (a key per
#: distinct set of shapes; a long-running process with ever-new shapes stays bounded).
MAX_ENTRIES = 4096

_bound: dict[tuple, tuple] = {}
#: (id(kernel), argument types...) -> (tensor getter, other getter, number)
_layouts: dict[tuple, tuple] = {}
_params: dict[int, tuple] = {}  # id(kernel) -> (parameter names, defaults, kernel)
_runtime: list = []  # [triton.knobs.runtime, driver, JITFunction], filled on first use


def _setup() -> list:
    if not _runtime:
        import triton
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        _runtime.extend([triton.knobs.runtime, driver, JITFunction])
    return _runtime


def _names(fn) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The kernel's parameter names in order and the defaults of those that have one."""
    return _param_info(fn)[:2]


def _param_info(fn) -> tuple:
    """(names, defaults, positions of the constexpr parameters, fn)."""
    found = _params.get(id(fn))
    if found is None:
        names = tuple(p.name for p in fn.params)
        defaults = {p.name: p.default for p in fn.params if p.has_default}
        constexprs = frozenset(i for i, p in enumerate(fn.params) if p.is_constexpr)
        found = _params[id(fn)] = (names, defaults, constexprs, fn)  # fn kept: its id stays
    return found


def launch(fn, grid: tuple, args: dict[str, Any], **options: Any) -> None:
    """Launch Triton kernel ``fn`` on ``grid`` with keyword ``args`` (and launch
    ``options`` such as ``num_warps``), as ``fn[grid](**args, **options)`` does.

    Raises:
        TypeError: an argument of the kernel is missing from ``args`` (named), or ``args``
            names one the kernel does not have.
    """
    recording = _replay.recorder()
    if recording is not None:  # a host program's recording, or no launches at all
        recording.launch(fn, grid, args, options, bound)
        return
    if hook is not None:
        hook(fn, grid, args, options)
        return
    bound(fn, grid, args, options)


def bound(fn, grid: tuple, args: dict[str, Any], options: dict[str, Any]):
    """:func:`launch` without the hook: the pre-bound path, or the full one on a miss.

    Returns ``((launcher, function, metadata), values, device)``, what a direct call of the
    launcher takes (``values``: the arguments in parameter order), or None where the launch
    took Triton's path (the interpreter, launch hooks)."""
    knobs, driver, jit_function = _runtime or _setup()
    if not isinstance(fn, jit_function) or _hooked(knobs):
        fn[grid](**args, **options)
        return None
    names, defaults = _names(fn)
    if len(args) != len(names) - len(defaults) or defaults:
        values = _values_with_defaults(fn, names, defaults, args)
    else:
        try:
            values = [args[name] for name in names]
        except KeyError as missing:
            raise TypeError(f"{fn.__name__}: missing argument {missing.args[0]!r}") from None
    device = driver.active.get_current_device()
    types = (id(fn), *map(type, values))
    layout = _layouts.get(types)
    if layout is None:
        layout = _layouts[types] = _layout(types[1:], _param_info(fn)[2])
    tensors, others = layout[0](values), layout[1](values)
    # id(fn): hashing a JITFunction goes through its ``cache_key`` property.
    key = (id(fn), device, layout[2], *options.items(), others,
           tuple([(t.dtype, t.data_ptr() & 15) for t in tensors]))
    entry = _bound.get(key)
    if entry is None:
        kernel = fn.run(grid=grid, warmup=False, **args, **options)
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        if len(_bound) >= MAX_ENTRIES:
            _bound.clear()
        entry = _bound[key] = (kernel.run, kernel.function, kernel.packed_metadata)
        return entry, values, device
    run, function, metadata = entry
    stream = driver.active.get_current_stream(device)
    size = len(grid)
    run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, function,
        metadata, None, None, None, *values)
    return entry, values, device


def hooked() -> bool:
    """Whether Triton launch hooks are installed (launches must take Triton's path)."""
    return _hooked((_runtime or _setup())[0])


def _hooked(knobs) -> bool:
    """Whether a launch hook is installed: Triton 3.6 keeps them in ``HookChain`` objects
    (empty when none is), others as a callable or None."""
    for chain in (knobs.launch_enter_hook, knobs.launch_exit_hook):
        if chain is not None and getattr(chain, "calls", True):
            return True
    return False


def _layout(types: tuple[type, ...], constexprs: frozenset[int]) -> tuple:
    """For arguments of these types in order: a getter of the tensors, a getter of what is
    keyed by value (everything but tensors and the floats that are not constexprs), and a
    number naming the layout."""
    tensors = [i for i, t in enumerate(types) if issubclass(t, Tensor)]
    others = [i for i, t in enumerate(types)
              if i in constexprs or not issubclass(t, (Tensor, float))]
    return _getter(tensors), _getter(others), len(_layouts)


def _getter(indices: list[int]):
    """A function returning the items at ``indices`` of a list as a tuple (itemgetter returns
    a bare item for one index and fails for none)."""
    if not indices:
        return lambda values: ()
    if len(indices) == 1:
        index = indices[0]
        return lambda values: (values[index],)
    return operator.itemgetter(*indices)


def _values_with_defaults(fn, names, defaults, args) -> list:
    unknown = set(args) - set(names)
    if unknown:
        raise TypeError(f"{fn.__name__}: no parameter named {sorted(unknown)[0]!r}")
    values = []
    for name in names:
        if name in args:
            values.append(args[name])
        elif name in defaults:
            values.append(defaults[name])
        else:
            raise TypeError(f"{fn.__name__}: missing argument {name!r}")
    return values


def clear() -> None:
    """Forget every bound launch (the compiled kernels stay in Triton's caches)."""
    _bound.clear()
    _layouts.clear()
