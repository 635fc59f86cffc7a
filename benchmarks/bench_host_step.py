"""Host time of a whole op call through the real launch path, on a CPU.

What it measures: one eager call of the op as a training step makes it (forward and, where
the op has one, backward), with every Triton kernel compiled for sm_90 and launched by
Triton's own C launcher over the performance model's stand-in ``libcuda``
(``snl_kernels/perf/fake_libcuda.c``: every driver call returns success at once, so nothing
runs), CPU tensors standing in for CUDA ones. Everything the host does is in it: the input
checks, the backend choice, autograd, the launchers' plans, argument binding, the C
launcher, and PyTorch's own small ops between launches (on CPU tensors here; on a GPU each
would be a launch of its own). Only the driver's launch call itself is missing.

Shapes: small levels with the launch plans of the benchmark's (the WideResNet-50-2 levels'
structure: a Gram-path level, the tiled level, the same launches), so that PyTorch's CPU
ops between launches cost their host overhead, not arithmetic on large tensors.

Providers: ``replayed`` (the library as it runs: the fused loss's host code recorded once
per shape and replayed, ``snl_kernels._replay``; launches through
``snl_kernels._triton.launch``'s pre-bound path), ``bound`` (the host code as written at
every call, ``SNL_REPLAY=0``; launches pre-bound) and ``triton-run`` (the host code as
written, every launch through ``kernel[grid](...)``, Triton's ``JITFunction.run``, which
binds every argument at every launch).

Run this file alone, on a CPU, without ``TRITON_INTERPRET``::

    python -m pytest benchmarks/bench_host_step.py --benchmark-only

(with other benchmark files in the same session the kernels are already the interpreter's,
and the file skips; on a GPU the round times the real launches).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    pytest.skip("host time through the stand-in driver: run this file alone on a CPU, "
                "without TRITON_INTERPRET", allow_module_level=True)
pytest.importorskip("triton", reason="the Triton backend needs triton")

import snl_kernels
from snl_kernels.perf import workloads

OPS = ("distillation_l2", "distillation_l1", "cosine", "cram", "anomaly_map")
PROVIDERS = ("replayed", "bound", "triton-run")
#: Small levels with B = 16's launch plans (one sample; the cosine blocks as for 16).
LEVELS = ((16, 32, 32), (32, 16, 16), (128, 8, 8))
PLAN = replace(workloads.QUICK, levels=LEVELS)
CRAM = (2, 64, 8, 8, 16)  # B, D, h, w, K
MAP_SIZE = 64


def _step(op: str):
    """The op's call as a training step (or ``predict``) makes it; inputs and upstream
    gradients made here, once."""
    g = torch.Generator().manual_seed(0)
    if op == "cram":
        b, d, h, w, k = CRAM
        e = torch.randn((b, d, h, w), generator=g, requires_grad=True)
        c = torch.randn((k, d), generator=g, requires_grad=True)
        tau = torch.tensor(0.5 * math.log(d), requires_grad=True)
        upstream = [torch.randn((b, d, h, w), generator=g), torch.randn((b, k, h, w),
                    generator=g), torch.randn((b, h, w), generator=g)]
        leaves = (e, c, tau)

        def call():
            out = snl_kernels.cram(e, c, tau, backend="triton")
            torch.autograd.backward(list(out), upstream)
    else:
        teachers = [torch.randn((1, *level), generator=g) for level in LEVELS]
        students = [(t + 0.5 * torch.randn(t.shape, generator=g)).requires_grad_()
                    for t in teachers]
        leaves = students
        if op == "cosine":
            def call():
                out = snl_kernels.spatial_channel_loss(teachers, students, backend="triton")
                torch.autograd.backward(list(out))
        elif op == "anomaly_map":
            def call():
                with torch.no_grad():
                    snl_kernels.anomaly_map(teachers, students, MAP_SIZE, 4.0, "add",
                                            backend="triton")
        else:
            distance = op.rsplit("_", 1)[1]

            def call():
                out = snl_kernels.snl_distillation_loss(
                    teachers, students, intra_distance=distance, inter_distance=distance,
                    backend="triton")
                torch.autograd.backward(list(out.values()))

    def step():
        call()
        for x in leaves:
            x.grad = None

    return step


@pytest.fixture(scope="module")
def stand_in_driver():
    """Triton's CUDA driver over the stand-in libcuda, reporting an sm_90 device."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from snl_kernels import dispatch
    from snl_kernels.perf import compiled

    previous, previous_driver = dispatch.triton_interpreted, driver._active
    threads = torch.get_num_threads()
    driver.set_active(compiled._fake_cuda_driver(GPUTarget("cuda", 90, 32)))
    dispatch.triton_interpreted = lambda: True  # CPU tensors stand in for CUDA ones
    # PyTorch's CPU ops stand in for launches: their cost here is host overhead. One thread:
    # with two, an op PyTorch splits across threads (sqrt of a few thousand floats already)
    # waits milliseconds for a core that another process holds.
    torch.set_num_threads(1)
    yield
    # Put back as found (reset_active would look for a real GPU driver, and fail without).
    torch.set_num_threads(threads)
    dispatch.triton_interpreted = previous
    driver._active = previous_driver


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_host_step(benchmark, stand_in_driver, monkeypatch, op, provider):
    from snl_kernels._triton import launch

    if provider != "replayed":
        monkeypatch.setenv("SNL_REPLAY", "0")
    if provider == "triton-run":
        monkeypatch.setattr(launch, "hook",
                            lambda fn, grid, args, options: fn[grid](**args, **options))
    step = _step(op)
    launches = []
    with workloads.planned_for(PLAN):
        step()  # compiles, builds the map's operators, binds each launch once
        counting = launch.hook or launch.bound

        def count(fn, grid, args, options):
            launches.append(fn.__name__)
            counting(fn, grid, args, options)

        monkeypatch.setattr(launch, "hook", count)
        step()
        monkeypatch.setattr(launch, "hook", None if counting is launch.bound else counting)
        benchmark.pedantic(step, rounds=200, iterations=5, warmup_rounds=10)
    benchmark.extra_info.update(op=op, provider=provider, launches=len(launches))
