"""Backend choice, with the reasons a backend cannot run.

Order of precedence, evaluated on every call:

1. the ``backend=`` argument of the op, when not None;
2. the ``SNL_BACKEND`` environment variable, when set and not ``auto`` (read on every call,
   so it can be changed at run time);
3. automatic: on CUDA inputs, the first backend of the op's order (``AUTO_ORDER``: fastest
   first as measured on an H200) that can run on the inputs, else the reference
   (``torch``; the intra-affinity l2 loss then takes its PyTorch Gram form where it
   applies, :mod:`snl_kernels.gram_path`, and the cosine distances and the fused
   distillation loss their shared PyTorch form, :mod:`snl_kernels.shared_torch`). Where the
   reference was measured faster than both kernels (the inter-affinity loss), the order is
   the reference alone.

An explicitly requested backend that cannot run raises ``BackendUnavailableError`` listing
every reason; automatic mode never raises, it falls back to the reference. Automatic mode
does not pick Triton's CPU interpreter (it is slow and meant for tests): ask for
``backend="triton"`` explicitly with ``TRITON_INTERPRET=1`` set before import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _cuda, _env

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "SNL_BACKEND"
# The CUDA extension's ops behind each public op: an extension built from older sources
# loads but lacks some, and the reason then says to rebuild.
CUDA_OPS = {
    "cosine_distances": ("cosine_distances_fwd", "cosine_distances_bwd"),
    "intra_affinity_loss": ("intra_affinity_fwd", "intra_affinity_bwd"),
    "inter_affinity_loss": ("inter_affinity_fwd", "inter_affinity_bwd"),
    "cram": ("cram_fwd", "cram_bwd"),
    "anomaly_map": ("anomaly_map_distances", "anomaly_map_combine"),
}


# Automatic mode's order per op, fastest first: one forward and backward at the benchmark
# shapes on an H200 (BENCHMARKS.md, GPU rounds of 2026-11-30; ms for cuda / triton / torch).
AUTO_ORDER = {
    "cosine_distances": ("cuda", "triton"),  # 1.73 / 3.47 / 5.07
    "intra_affinity_loss": ("triton", "cuda"),  # l2 13.1 / 4.58 / 19.4; l1 83.2 / 16.8 / 18.9
    "inter_affinity_loss": ("torch",),  # l2 15.0 / 5.43 / 3.62; l1 15.0 / 5.77 / 3.59
    "cram": ("cuda", "triton"),  # 0.89 / 1.82 / 2.09
    "anomaly_map": ("cuda", "triton"),  # 0.25 / 0.56 / 1.13
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the op on these inputs."""


_triton_error: str | None = None
_triton_checked = False


def triton_import_error() -> str | None:
    """Why Triton cannot be imported, or None when it can."""
    global _triton_checked, _triton_error
    if not _triton_checked:
        _triton_checked = True
        if importlib.util.find_spec("triton") is None:
            _triton_error = "Triton is not installed (pip install triton)"
        else:
            try:
                import triton  # noqa: F401
            except Exception as exc:
                _triton_error = f"Triton failed to import ({type(exc).__name__}: {exc})"
    return _triton_error


@torch.compiler.assume_constant_result
def triton_interpreted() -> bool:
    """Whether this process's Triton kernels run on the CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when a kernel is defined, that is when the kernel
    modules are imported; before that, the variable's current value decides. Under
    ``torch.compile`` the answer is a constant of the graph: Dynamo would otherwise guard on
    the module's absence from ``sys.modules``, and a compile that imports the kernels (the
    first call of a process) would fail its own guard.
    """
    module = sys.modules.get("snl_kernels._triton.cosine_distances")
    if module is not None:
        return bool(module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_DEVICES = frozenset(("cpu", "cuda"))


_ONLY_CUDA = frozenset(("cuda",))
_ONLY_CPU = frozenset(("cpu",))
_CPU_AND_CUDA = frozenset(("cpu", "cuda"))


def _devices(tensors: Sequence[Tensor]) -> frozenset[str]:
    # is_cuda / is_cpu first: reading ``.device.type`` costs about 1 us of host time per
    # tensor on this project's CPU, and this runs on every op call.
    cuda = 0
    for t in tensors:
        if t.is_cuda:
            cuda += 1
        elif not t.is_cpu:
            return frozenset("cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
                             for x in tensors)
    if cuda == 0:
        return _ONLY_CPU if tensors else frozenset()
    return _ONLY_CUDA if cuda == len(tensors) else _CPU_AND_CUDA


_cuda_ready: frozenset[str] | None = None


def cuda_ready_ops() -> frozenset[str]:
    """The public ops the CUDA backend can run on CUDA tensors in this process: a CUDA build
    of PyTorch, a visible GPU, the extension loaded with every kernel of the op. Read once,
    when all of that holds (none of it changes later in a process); empty until then."""
    global _cuda_ready
    if _cuda_ready is not None:
        return _cuda_ready
    if torch.version.cuda is None or not torch.cuda.is_available() or not _cuda.load():
        return frozenset()
    _cuda_ready = frozenset(op for op, names in CUDA_OPS.items()
                            if all(_cuda.has_op(name) for name in names))
    return _cuda_ready


def unavailable_reasons(
    backend: str, op: str, tensors: Sequence[Tensor], implemented: Sequence[str],
    why_not: str | None = None, devices: frozenset[str] | set[str] | None = None,
) -> list[str]:
    """Every reason ``backend`` cannot run ``op`` on ``tensors`` (empty list: it can).

    ``why_not`` is a reason, specific to this call, that rules out every kernel backend
    (e.g. float64 inputs, or gradients requested from an inference-only kernel).
    ``devices``: the tensors' device types, where the caller has them already.
    """
    if backend == "torch":
        return []
    if devices is None:
        devices = _devices(tensors)
    # The common case first, without building the list (this runs on every op call).
    if (backend == "triton" and not why_not and _triton_checked and _triton_error is None
            and backend in implemented
            and (devices is _ONLY_CUDA or (devices is _ONLY_CPU and triton_interpreted()))):
        return []
    if (backend == "cuda" and not why_not and devices is _ONLY_CUDA and backend in implemented
            and op in (_cuda_ready if _cuda_ready is not None else cuda_ready_ops())):
        return []
    reasons: list[str] = []
    if backend not in implemented:
        reasons.append(f"{op} has no {backend} implementation yet")
    if why_not:
        reasons.append(why_not)
    if backend == "triton":
        err = triton_import_error()
        if err:
            reasons.append(err)
        if "cpu" in devices and not triton_interpreted():
            reasons.append(
                "the inputs are on the CPU and Triton's interpreter is off "
                "(set TRITON_INTERPRET=1 before importing snl_kernels to run kernels on the CPU)"
            )
        if not devices <= _TRITON_DEVICES:
            others = sorted(devices - _TRITON_DEVICES)
            reasons.append(f"the inputs are on {others}; Triton runs on CUDA GPUs")
    elif backend == "cuda":
        if torch.version.cuda is None:
            reasons.append(f"PyTorch {torch.__version__} is a CPU build")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
        if not _cuda.load():
            reasons.append(
                "the CUDA extension snl_kernels._C is not built or failed to load "
                f"({_cuda.load_error()}); build it with "
                "`pip install --no-build-isolation -e .` where nvcc and a CUDA PyTorch are present"
            )
        else:
            missing = [name for name in CUDA_OPS.get(op, ()) if not _cuda.has_op(name)]
            if missing:
                reasons.append(
                    "the CUDA extension snl_kernels._C was built without "
                    + ", ".join(f"snl::{name}" for name in missing)
                    + " (built from older sources); rebuild it with "
                    "`pip install --no-build-isolation -e .`"
                )
        if devices - {"cuda"}:
            reasons.append(
                f"the inputs are on {sorted(devices)}; the CUDA kernels need CUDA tensors"
            )
    return reasons


_ENV_EXACT = {"auto": None, **{name: name for name in BACKENDS}}


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for by the argument or ``SNL_BACKEND``; None means automatic."""
    if backend is None:
        env = _env.get(ENV_VAR)
        if not env:
            return None
        if env in _ENV_EXACT:  # the common spellings without string operations
            return _ENV_EXACT[env]
        env = env.strip().lower()
        if env in ("", "auto"):
            return None
        if env not in BACKENDS:
            raise ValueError(
                f"{ENV_VAR} must be one of {', '.join(BACKENDS)} or auto, got {env!r}"
            )
        return env
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(repr(b) for b in BACKENDS)} or None, "
            f"got {backend!r}"
        )
    return backend


def select_backend(
    op: str,
    backend: str | None,
    tensors: Sequence[Tensor],
    implemented: Sequence[str] = (),
    prefer: Sequence[str] | None = None,
    why_not: str | None = None,
) -> str:
    """Choose the backend that runs ``op`` on ``tensors``.

    Args:
        op: the op's name, for messages.
        backend: the caller's ``backend=`` argument.
        tensors: the op's tensor inputs (their devices matter).
        implemented: the kernel backends ("triton", "cuda") that implement ``op``.
        prefer: automatic mode's order of backends; None: ``AUTO_ORDER[op]``, else
            ("cuda", "triton").
        why_not: a reason specific to this call that rules out every kernel backend.

    Returns:
        "torch", "triton" or "cuda".

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run, with every reason.
        ValueError: the argument or ``SNL_BACKEND`` names no backend.
    """
    requested = requested_backend(backend)
    devices = _devices(tensors)
    if requested is not None:
        why = unavailable_reasons(requested, op, tensors, implemented, why_not, devices)
        if why:
            source = "backend=" if backend is not None else f"{ENV_VAR}="
            raise BackendUnavailableError(
                f"{op}: {source}{requested!r} cannot run: " + "; ".join(why)
            )
        return requested
    if devices == {"cuda"}:
        for candidate in prefer if prefer is not None else AUTO_ORDER.get(op, ("cuda", "triton")):
            if not unavailable_reasons(candidate, op, tensors, implemented, why_not, devices):
                return candidate
    return "torch"


def availability(op: str = "cosine_distances", implemented: Sequence[str] = ("triton", "cuda"),
                 device: str | None = None) -> dict[str, list[str]]:
    """Reasons each backend is unavailable for ``op`` on ``device`` (empty list: available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = [torch.empty(1, device=device)]
    return {b: unavailable_reasons(b, op, probe, implemented) for b in BACKENDS}
