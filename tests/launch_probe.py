"""Probes of the pre-bound launcher (``snl_kernels._triton.launch``) through the real launch
path: kernels compiled for sm_90 and launched by Triton's C launcher over the performance
model's stand-in ``libcuda`` (every driver call returns success; nothing runs), CPU tensors
standing in for CUDA ones.

Run as a script with ``TRITON_INTERPRET`` unset (tests/test_launch.py does); prints one JSON
object with what each probe saw.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * alpha, mask=offs < n)


@triton.jit
def clamp_kernel(x_ptr, n, EPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, tl.maximum(x, EPS), mask=offs < n)


def install() -> None:
    """Triton's own CUDA driver over the stand-in libcuda, an sm_90 target, device 0."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from snl_kernels import dispatch
    from snl_kernels.perf import compiled

    driver.set_active(compiled._fake_cuda_driver(GPUTarget("cuda", 90, 32)))
    dispatch.triton_interpreted = lambda: True  # CPU tensors stand in for CUDA ones


class Seen:
    """Counts launches that take Triton's full path (``JITFunction.run``) and records what
    every launch hands the C launcher."""

    def __init__(self) -> None:
        from triton.backends.nvidia.driver import CudaLauncher
        from triton.runtime.jit import JITFunction

        self.full = 0
        self.calls: list[tuple] = []
        real_run, real_call = JITFunction.run, CudaLauncher.__call__
        seen = self

        def run(fn, *args, **kwargs):
            seen.full += 1
            return real_run(fn, *args, **kwargs)

        def call(launcher, gridX, gridY, gridZ, stream, function, metadata, launch_metadata,
                 enter, exit_, *args):
            seen.calls.append(((gridX, gridY, gridZ), stream, function, metadata, args))
            return real_call(launcher, gridX, gridY, gridZ, stream, function, metadata,
                             launch_metadata, enter, exit_, *args)

        JITFunction.run = run
        CudaLauncher.__call__ = call


def _same(a: tuple, b: tuple) -> bool:
    """Two launcher calls with the same grid, stream, function, metadata and arguments
    (tensors by identity)."""
    if a[:4] != b[:4] or len(a[4]) != len(b[4]):
        return False
    return all(x is y if isinstance(x, torch.Tensor) else x == y
               for x, y in zip(a[4], b[4], strict=True))


def probe_scale(seen: Seen) -> dict:
    from snl_kernels._triton import launch

    out: dict = {}
    x, y = torch.randn(1000), torch.empty(1000)
    args = dict(x_ptr=x, y_ptr=y, n=1000, alpha=2.0, BLOCK=256)
    launch.launch(scale_kernel, (4,), args)
    out["first_full"] = seen.full
    x2, y2 = torch.randn(1000), torch.empty(1000)
    args2 = dict(x_ptr=x2, y_ptr=y2, n=1000, alpha=-3.5, BLOCK=256)
    launch.launch(scale_kernel, (4,), args2)
    out["second_full"] = seen.full
    bound_call = seen.calls[-1]
    scale_kernel[(4,)](**args2)  # Triton's own path, the same arguments
    out["same_as_triton"] = _same(bound_call, seen.calls[-1])
    full = seen.full
    launch.launch(scale_kernel, (4,), dict(args2, x_ptr=x2[1:], n=999))  # 4-byte aligned
    out["unaligned_full"] = seen.full - full
    full = seen.full
    launch.launch(scale_kernel, (4,), dict(args2, n=1))  # Triton makes n == 1 a constant
    out["n1_full"] = seen.full - full
    full = seen.full
    launch.launch(scale_kernel, (4,), dict(args2, x_ptr=x2.double(), y_ptr=y2.double()))
    out["dtype_full"] = seen.full - full
    full = seen.full
    launch.launch(scale_kernel, (4,), args2, num_warps=2)
    out["options_full"] = seen.full - full
    full = seen.full
    launch.launch(scale_kernel, (4,), dict(args2, alpha=7.0))
    out["again_full"] = seen.full - full
    for bad, name in ((dict(x_ptr=x, y_ptr=y, n=1000, BLOCK=256), "missing"),
                      (dict(args, beta=1.0), "unknown")):
        try:
            launch.launch(scale_kernel, (4,), bad)
            out[name] = None
        except TypeError as error:
            out[name] = str(error)
    return out


def probe_constexpr_float(seen: Seen) -> dict:
    from snl_kernels._triton import launch

    x = torch.randn(100)
    launch.launch(clamp_kernel, (1,), dict(x_ptr=x, n=100, EPS=1e-8, BLOCK=128))
    full = seen.full
    launch.launch(clamp_kernel, (1,), dict(x_ptr=x, n=100, EPS=1e-8, BLOCK=128))
    same = seen.full - full
    launch.launch(clamp_kernel, (1,), dict(x_ptr=x, n=100, EPS=1e-3, BLOCK=128))
    return {"same_eps_full": same, "new_eps_full": seen.full - full - same}


def probe_hook(seen: Seen) -> dict:
    from snl_kernels._triton import launch

    x, y = torch.randn(1000), torch.empty(1000)
    args = dict(x_ptr=x, y_ptr=y, n=1000, alpha=2.0, BLOCK=256)
    launch.launch(scale_kernel, (4,), args)
    hooked = []
    enter = triton.knobs.runtime.launch_enter_hook
    if not hasattr(enter, "add"):  # a Triton that keeps one callable
        return {"hook_full": None}
    enter.add(hooked.append)
    try:
        full = seen.full
        launch.launch(scale_kernel, (4,), args)
        return {"hook_full": seen.full - full, "hook_called": len(hooked)}
    finally:
        enter.remove(hooked.append)


def probe_fused_step(seen: Seen) -> dict:
    """The fused l2 loss, forward and backward, at small shapes of the benchmark's plan."""
    import snl_kernels

    g = torch.Generator().manual_seed(0)
    teachers = [torch.randn((1, c, h, w), generator=g)
                for c, h, w in ((16, 32, 32), (32, 16, 16), (128, 8, 8))]
    students = [(t + 0.5 * torch.randn(t.shape, generator=g)).requires_grad_()
                for t in teachers]

    def step():
        out = snl_kernels.snl_distillation_loss(teachers, students, backend="triton")
        torch.autograd.backward(list(out.values()))

    step()
    full, calls = seen.full, len(seen.calls)
    step()
    out = {"step_full": seen.full - full, "step_launches": len(seen.calls) - calls}
    replayed = _canonical(seen.calls[calls:], students)
    os.environ["SNL_REPLAY"] = "0"  # the host code as written, every call
    try:
        calls = len(seen.calls)
        step()
        written = _canonical(seen.calls[calls:], students)
    finally:
        del os.environ["SNL_REPLAY"]
    out["replayed_as_written"] = replayed == written
    return out


def _canonical(calls: list, inputs: list) -> list:
    """A step's launcher calls with each tensor as (shape, stride, dtype, which input it is,
    or the order in which its address first appeared in the step), so that two steps' calls
    compare equal when they launch the same kernels on the same kinds of tensors, aliased
    alike."""
    first: dict[int, int] = {}
    out = []
    for grid, stream, function, metadata, args in calls:
        named = []
        for x in args:
            if isinstance(x, torch.Tensor):
                which = next((i for i, t in enumerate(inputs) if t.data_ptr() == x.data_ptr()),
                             None)
                if which is None:
                    which = ("fresh", first.setdefault(x.data_ptr(), len(first)))
                named.append((tuple(x.shape), x.stride(), x.dtype, which))
            else:
                named.append(x)
        out.append((grid, stream, function, metadata, tuple(named)))
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    install()
    seen = Seen()
    out = {}
    for probe in (probe_scale, probe_constexpr_float, probe_hook, probe_fused_step):
        out.update(probe(seen))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
