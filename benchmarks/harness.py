"""Benchmark harness (imported by the bench files; ``conftest.py`` holds only the fixture):
synchronised timing, ideal bytes, bandwidth and peak extra memory.

Every benchmark goes through :func:`run_benchmark`, which checks the provider's output once
against the eager reference, then times a callable that synchronises the GPU inside itself,
and stores in ``extra_info``: the ideal bytes a fused kernel must move, GB/s on those bytes,
the fraction of the copy bandwidth measured on this machine (``bench_copy.py`` measures
the same ceiling as a benchmark of its own), and the peak extra memory of one call.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable

import torch
from shapes import DEVICE, HAS_GPU

from snl_kernels import dispatch

PROVIDERS = ("eager", "compile", "triton", "cuda")


def sync() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


def measure_copy_bandwidth(nbytes: int = 1 << 30 if HAS_GPU else 1 << 28, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes over time)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def skip_reason(provider: str, op_module: str) -> str | None:
    """Why ``provider`` cannot be timed for ``op_module`` here, or None."""
    if provider in ("eager", "compile"):
        return None
    module = importlib.import_module(f"snl_kernels.{op_module}")
    if provider == "triton" and not HAS_GPU:
        return "Triton kernels are timed on a CUDA GPU only (the CPU interpreter is for tests)"
    probe = [torch.empty(1, device=DEVICE)]
    why = dispatch.unavailable_reasons(provider, module.OP, probe, module.IMPLEMENTED)
    return "; ".join(why) if why else None


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Peak memory one call allocates beyond what is allocated before it (GPU only)."""
    if not HAS_GPU:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - before


def run_benchmark(benchmark, fn: Callable[[], object], ideal_bytes: int, copy_gbps: float,
                  check: Callable[[], None] | None = None) -> None:
    """Check once, then time ``fn`` (synchronised) and record bandwidth and memory."""
    if check is not None:
        check()
    fn()  # warm-up: compilation and autotuning stay out of the timings
    extra = peak_extra_bytes(fn)

    def timed() -> None:
        fn()
        sync()

    benchmark(timed)
    info = benchmark.extra_info
    info["device"] = torch.cuda.get_device_name(0) if HAS_GPU else "cpu"
    info["ideal_bytes"] = ideal_bytes
    info["copy_gbps"] = round(copy_gbps, 1)
    info["peak_extra_mb"] = None if extra is None else round(extra / 2**20, 1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        info["median_ms"] = round(median * 1e3, 4)
        info["gbps"] = round(ideal_bytes / median / 1e9, 1)
        info["frac_copy_bw"] = round(ideal_bytes / median / 1e9 / copy_gbps, 3)


def provider_op(provider: str, reference_fn: Callable, public_fn: Callable) -> Callable:
    """The callable a provider times: the reference, its ``torch.compile``, or a kernel."""
    if provider == "eager":
        return reference_fn
    if provider == "compile":
        # Static shapes: one specialisation per shape, as the kernels have (dynamic shapes
        # fail to lower adaptive_avg_pool2d in torch 2.11's Inductor).
        return torch.compile(reference_fn, dynamic=False)
    return functools.partial(public_fn, backend=provider)


def with_backward(forward: Callable[[], object], loss: Callable[[object], torch.Tensor],
                  params: list[torch.Tensor]) -> Callable[[], object]:
    """``forward`` followed by the backward of ``loss`` into ``params`` (grads reset first)."""

    def run() -> object:
        out = forward()
        for p in params:
            p.grad = None
        loss(out).backward()
        return out

    return run


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
