"""Fake implementations and autograd of an op's forward/backward pair, in each kernel backend.

The Triton ops are ``torch.library.custom_op`` functions in namespace ``snl_triton``; the CUDA
ops are the extension's ``snl`` ops with the same schemas (``csrc/ops.cpp``), registered here
only where the loaded extension has them. Both get the same fake implementations and the
same autograd formula, built around each backend's own backward op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _cuda


def register_kernel_ops(fwd: str, bwd: str, triton_bwd: Callable, fake_fwd: Callable,
                        fake_bwd: Callable, make_backward: Callable[[Callable], Callable],
                        setup_context: Callable) -> dict[str, Callable]:
    """Register ``fwd``/``bwd`` (op names without namespace) for every kernel backend.

    Args:
        fwd, bwd: the forward and backward op names, e.g. "cram_fwd", "cram_bwd".
        triton_bwd: the Triton backward op (``snl_triton::<bwd>``).
        fake_fwd, fake_bwd: their fake (meta) implementations.
        make_backward: builds the autograd backward from a backend's backward op.
        setup_context: the autograd ``setup_context``.

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
        forward[backend] = getattr(getattr(torch.ops, namespace), fwd)
    return forward
