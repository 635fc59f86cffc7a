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
_cuda_ops: frozenset[str] = frozenset()  # ops of namespace snl with a CUDA kernel


def load() -> bool:
    """Import ``snl_kernels._C`` once; return whether it loaded."""
    global _loaded, _error, _cuda_ops
    if _loaded is None:
        try:
            importlib.import_module("snl_kernels._C")
        except Exception as exc:  # any failure (missing .so, bad symbol) means "not built"
            _loaded = False
            _error = f"{type(exc).__name__}: {exc}"
        else:
            _loaded = True
            _cuda_ops = frozenset(
                entry.split("::", 1)[1].split(".", 1)[0]
                for entry in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
                if entry.startswith("snl::")
            )
    return _loaded


def load_error() -> str | None:
    """The import error of the extension, or None when it loaded."""
    load()
    return _error


def has_op(name: str) -> bool:
    """Whether the extension defines ``torch.ops.snl.<name>`` with a CUDA kernel.

    A lookup in the set read from the dispatcher when the extension loaded (its ops cannot
    change after that), so ``torch.compile`` traces it as a constant: the dispatcher query
    itself cannot be traced (``fullgraph=True`` failed on it).
    """
    return load() and name in _cuda_ops
