"""SNL's distillation terms as a training loss uses them: every term, three WRN50 levels,
forward and backward, weighted as ``snl train`` weighs them (issue #16, part 7).

Providers:

- ``eager`` / ``compile``: the reference ops (the specification), eager and under
  ``torch.compile``;
- ``separate-triton``: the separate public ops with ``backend="triton"`` (one call per op,
  per level and pair, the registered ``torch.library`` path where not eager);
- ``shared-triton``: ``snl_kernels.snl_distillation_loss(..., backend="triton")``, the shared
  path (norms and pooled levels computed once, levels grouped into launches);
- ``shared-triton-graph``: the same forward and backward captured once in a CUDA graph and
  replayed (``torch.cuda.graph``): what the host overhead costs shows as the difference to
  ``shared-triton``. A capture that fails fails this benchmark with the reason;
- ``shared-triton-compile``: the shared path under ``torch.compile`` (its registered op
  pair, ``snl_kernels/distillation_op.py``), what a compiled training step runs. Like
  ``compile``, left out of the GPU round's timed benchmarks (``-k "not compile"``) for its
  compile time.

Kernel providers are timed on a CUDA GPU only (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import pytest
import torch
from harness import HAS_GPU, nbytes, run_benchmark
from shapes import levels

import snl_kernels
from snl_kernels import distillation

WEIGHTS = {"rd": 1.0, "channel": 0.01, "spatial": 0.01, "intra": 0.01, "inter": 0.01}
PROVIDERS = ["eager", "compile", "separate-triton", "shared-triton", "shared-triton-graph",
             "shared-triton-compile"]


def _total(terms):
    return sum(WEIGHTS[name] * value for name, value in terms.items())


def _loss_fn(provider, distance):
    if provider in ("eager", "compile"):
        fn = lambda t, s: _total(distillation._separate(t, s, distillation.TERMS, distance,
                                                        distance, "torch"))
        return torch.compile(fn, dynamic=False) if provider == "compile" else fn
    if provider == "separate-triton":
        return lambda t, s: _total(distillation._separate(t, s, distillation.TERMS, distance,
                                                          distance, "triton"))
    fn = lambda t, s: _total(snl_kernels.snl_distillation_loss(
        t, s, intra_distance=distance, inter_distance=distance, backend="triton"))
    return torch.compile(fn, dynamic=False) if provider == "shared-triton-compile" else fn


def _graphed(step):
    """``step`` (returns tensors) captured in a CUDA graph: a function that replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the capture: compilation, allocator pools
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return lambda: (graph.replay(), outputs)[1]


@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_distillation_loss(benchmark, copy_gbps, provider, distance):
    if provider not in ("eager", "compile") and not HAS_GPU:
        pytest.skip("Triton kernels are timed on a CUDA GPU only (the CPU interpreter is for "
                    "tests)")
    teachers, students = levels(requires_grad=True)
    loss_fn = _loss_fn(provider, distance)

    def step():
        return torch.autograd.grad(loss_fn(teachers, students), students)

    fn = _graphed(step) if provider == "shared-triton-graph" else step
    ideal = nbytes(*teachers, *students) + nbytes(*students)

    def check():
        t64 = [t.detach().double() for t in teachers]
        s64 = [s.detach().double().requires_grad_(True) for s in students]
        want = torch.autograd.grad(_loss_fn("eager", distance)(t64, s64), s64)
        for got, ref in zip(fn(), want, strict=True):
            err = ((got.double() - ref).norm() / ref.norm()).item()
            assert err <= 1e-3, err

    run_benchmark(benchmark, fn, ideal, copy_gbps, check)
    benchmark.extra_info.update(provider=provider, distance=distance)
