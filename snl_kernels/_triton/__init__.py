"""Triton kernels, imported lazily by the op modules (Triton is an optional dependency).

Triton decides at definition time whether a kernel is compiled or run by its CPU
interpreter (``TRITON_INTERPRET=1``), so that variable must be set before these modules are
first imported.

The launchers choose their tiles, blocks, warps and product precisions through
``gpu_config`` at every launch: a GPU's choice when the kernels are compiled, a smaller one
that keeps the interpreter quick on test shapes otherwise. ``SNL_TRITON_CONFIG=gpu`` makes
the interpreter run exactly what a GPU launch would (the tests do, so the GPU's tiles are
executed on a CPU); ``SNL_TRITON_CONFIG=cpu`` forces the interpreter's choice.

Triton 3.6's interpreter needs numpy < 2.4 (``pip install "numpy<2.4"``; 2.3.5 runs the
tests). It passes integer arguments to the kernel as 1-element numpy arrays and converts
them back with ``int(array)`` when a loop bound needs an index (``for k0 in range(0, K,
BLOCK_K)``); numpy 2.4 turned that conversion, deprecated since 1.25, into "TypeError: only
0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171; Triton
3.9's interpreter squeezes the array first). Most kernels here loop to a runtime bound, and
no kernel-side change avoids it that keeps the compiled loop a pipelined ``for``. Compiled
code is not affected: the interpreter's argument handling is not used there.
"""

import importlib
import os

CONFIG_VARIABLE = "SNL_TRITON_CONFIG"
CONFIGS = ("gpu", "cpu")


def gpu_config(interpreted: bool) -> bool:
    """Whether launches use the GPU's configuration (read at each launch).

    Args:
        interpreted: whether the launching module's kernels run on the CPU interpreter.

    Returns:
        ``SNL_TRITON_CONFIG`` == "gpu" -> True, == "cpu" -> False; unset or empty: True when
        the kernels are compiled (for a GPU), False under the interpreter.

    Raises:
        ValueError: ``SNL_TRITON_CONFIG`` has another value (the message shows it).
    """
    value = os.environ.get(CONFIG_VARIABLE, "")
    if not value:
        return not interpreted
    if value not in CONFIGS:
        raise ValueError(f"{CONFIG_VARIABLE} must be one of {', '.join(CONFIGS)} (or unset), "
                         f"got {value!r}")
    return value == "gpu"


_split: dict[str, list[str]] = {}


def strides(x, names: str) -> dict[str, int]:
    """x's strides as keyword arguments of a launch, one name per dimension in order:
    ``**strides(teacher, "stride_tb stride_tc stride_th stride_tw")``."""
    split = _split.get(names)
    if split is None:
        split = _split[names] = names.split()
    return dict(zip(split, x.stride(), strict=True))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host code (``triton.cdiv`` is a constexpr function in
    Triton 3.6: each host call unwraps its arguments, about 1 us)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n for n >= 1 (0 for 0), as ``triton.next_power_of_2``."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


_loaded: dict = {}


def kernels(name: str):
    """The kernel module ``snl_kernels._triton.<name>``, imported on its first use (importing
    it imports Triton, an optional dependency) and then taken from a dict: an ``import``
    statement in a launcher's call path costs microseconds of host time on every call."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(f"{__name__}.{name}")
    return module
