"""Loading of the CUDA C++ extension ``snl_kernels._C``.

The extension registers its ops in the ``torch.ops.snl`` namespace (schemas in
``csrc/ops.cpp``). Importing it never raises: when it is missing or fails to load, the
reason is kept so that ``dispatch`` and ``python -m snl_kernels`` can say why the ``cuda``
backend is unavailable.
"""

from __future__ import annotations

import importlib

import torch

_loaded: bool | None = None
_error: str | None = None


def load() -> bool:
    """Import ``snl_kernels._C`` once; return whether it loaded."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("snl_kernels._C")
        except Exception as exc:  # any failure (missing .so, bad symbol) means "not built"
            _loaded = False
            _error = f"{type(exc).__name__}: {exc}"
        else:
            _loaded = True
    return _loaded


def load_error() -> str | None:
    """The import error of the extension, or None when it loaded."""
    load()
    return _error


_has_op: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def has_op(name: str) -> bool:
    """Whether the extension defines ``torch.ops.snl.<name>`` with a CUDA kernel.

    Answered once per name (the extension cannot gain or lose ops once loaded) and a constant
    to ``torch.compile``, which cannot trace the dispatcher query (``fullgraph=True`` would
    fail on it).
    """
    if name not in _has_op:
        found = False
        if load():
            try:
                found = torch._C._dispatch_has_kernel_for_dispatch_key(f"snl::{name}", "CUDA")
            except RuntimeError:
                found = False
        _has_op[name] = found
    return _has_op[name]
