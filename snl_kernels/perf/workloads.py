"""The ops the performance model times, at the benchmark shapes or scaled ones.

Each workload builds fresh inputs for a :class:`Shapes`, runs the op's forward (and its
backward, separately, with fixed upstream gradients) through the public API with
``backend="triton"``, and states its ideal bytes: each input read once per direction, each
output and input gradient written once (DESIGN §3).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

#: (C, H, W) of the WideResNet-50-2 levels at 256 x 256 input.
WRN50 = ((256, 64, 64), (512, 32, 32), (1024, 16, 16))
OPS = ("cosine_distances", "intra_affinity_l2", "intra_affinity_l1", "inter_affinity_l2",
       "inter_affinity_l1", "distillation_l2", "distillation_l1", "cram", "anomaly_map")


@dataclass(frozen=True)
class Shapes:
    """Shapes of one run. ``plan_batch``: the batch the launch plans are chosen for (the
    feature ops' blocks depend on B); counting at ``batch`` 1 with ``plan_batch`` 16 runs
    one sample of exactly the launches of B = 16."""

    batch: int = 16
    levels: tuple = WRN50
    cram: tuple = (2048, 8, 8, 64)  # D, h, w, K
    cram_batch: int = 16
    map_size: int = 256
    plan_batch: int | None = None


#: BENCHMARKS.md's shapes: fp32, B = 16, the WRN50 levels; CRAM D = 2048, 8 x 8, K = 64; the
#: anomaly map to 256 x 256.
BENCHMARK = Shapes()
#: What the full model counts under the interpreter: one sample of B = 16's launches (the
#: feature ops' work is per sample, so their counts scale by 16 exactly); CRAM, whose
#: centres every row block reads, at its full batch.
COUNT_FULL = replace(BENCHMARK, batch=1, plan_batch=16)
#: The quick mode's shapes (CI): half the channels and half the side of every level, one
#: sample with B = 16's plans, CRAM at a quarter of D, the map to 128 x 128.
QUICK = Shapes(batch=1, levels=((128, 32, 32), (256, 16, 16), (512, 8, 8)),
               cram=(512, 8, 8, 64), map_size=128, plan_batch=16)


@dataclass
class Run:
    """An op's inputs and its two phases. ``backward`` is None for forward-only ops."""

    inputs: dict
    forward: Callable[[], tuple]
    backward: Callable[[tuple], None] | None
    ideal_bytes: int
    #: Called once before the counted phases: what a first call does once and later calls
    #: skip (the anomaly map's operators, built and cached on its first call).
    warmup: Callable[[], object] | None = None


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.dim())


def _levels(shapes: Shapes, seed: int = 0) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    teachers, students = [], []
    for c, h, w in shapes.levels:
        t = torch.randn((shapes.batch, c, h, w), generator=g)
        teachers.append(t)
        students.append((t + 0.5 * torch.randn(t.shape, generator=g)).requires_grad_())
    return teachers, students


def _feature_run(shapes: Shapes, body: Callable[[list, list], tuple]) -> Run:
    """An op over the levels whose outputs are losses: forward reads T and S, backward
    reads T and S and writes dS."""
    teachers, students = _levels(shapes)
    features = _nbytes(teachers) + _nbytes(students)
    ideal = 2 * features + _nbytes(students)

    def backward(outputs):
        torch.autograd.backward([o for o in outputs if o.requires_grad])

    return Run({"teachers": teachers, "students": students},
               lambda: tuple(body(teachers, students)), backward, ideal)


def _cosine(shapes):
    import snl_kernels

    return _feature_run(shapes, lambda t, s: snl_kernels.spatial_channel_loss(
        t, s, backend="triton"))


def _intra(distance):
    def make(shapes):
        import snl_kernels

        return _feature_run(shapes, lambda ts, ss: [
            snl_kernels.intra_affinity_loss(t, s, distance, backend="triton")
            for t, s in zip(ts, ss, strict=True)])
    return make


def _inter(distance):
    def make(shapes):
        import snl_kernels

        return _feature_run(shapes, lambda t, s: [
            snl_kernels.inter_affinity_loss(t[k], t[k + 1], s[k], s[k + 1], distance,
                                            backend="triton")
            for k in range(len(t) - 1)])
    return make


def _distillation(distance):
    def make(shapes):
        import snl_kernels

        return _feature_run(shapes, lambda t, s: tuple(snl_kernels.snl_distillation_loss(
            t, s, intra_distance=distance, inter_distance=distance,
            backend="triton").values()))
    return make


def _cram(shapes):
    import snl_kernels

    d, h, w, k = shapes.cram
    g = torch.Generator().manual_seed(0)
    e = torch.randn((shapes.cram_batch, d, h, w), generator=g, requires_grad=True)
    c = torch.randn((k, d), generator=g, requires_grad=True)
    tau = torch.tensor(0.5 * math.log(d), requires_grad=True)
    upstream = []

    def forward():
        out = tuple(snl_kernels.cram(e, c, tau, backend="triton"))
        upstream[:] = [torch.randn(o.shape, generator=g) for o in out]
        return out

    def backward(outputs):
        torch.autograd.backward(list(outputs), upstream)

    # Forward: read E and C, write central, assignment, compactness; backward: read E, C
    # and the outputs' gradients, write dE, dC.
    outputs = _nbytes([torch.empty(shapes.cram_batch, d, h, w),
                       torch.empty(shapes.cram_batch, k, h, w)])
    ideal = 2 * _nbytes([e, c]) + 2 * outputs + _nbytes([e, c])
    return Run({"embedding": e, "centers": c, "log_tau": tau}, forward, backward, ideal)


def _anomaly_map(shapes):
    import snl_kernels

    teachers, students = _levels(shapes)
    size = shapes.map_size

    def forward():
        with torch.no_grad():
            return tuple(snl_kernels.anomaly_map(teachers, students, size, 4.0, "add",
                                                 backend="triton"))

    ideal = _nbytes(teachers) + _nbytes(students) + 4 * shapes.batch * (size * size + 1)
    return Run({"teachers": teachers, "students": students}, forward, None, ideal,
               warmup=forward)


MAKERS: dict[str, Callable[[Shapes], Run]] = {
    "cosine_distances": _cosine,
    "intra_affinity_l2": _intra("l2"), "intra_affinity_l1": _intra("l1"),
    "inter_affinity_l2": _inter("l2"), "inter_affinity_l1": _inter("l1"),
    "distillation_l2": _distillation("l2"), "distillation_l1": _distillation("l1"),
    "cram": _cram, "anomaly_map": _anomaly_map,
}


def scale(op: str, shapes: Shapes) -> float:
    """Factor from a run at ``shapes`` to the same op at ``plan_batch`` samples."""
    if shapes.plan_batch is None:
        return 1.0
    return 1.0 if op == "cram" else shapes.plan_batch / shapes.batch


@contextlib.contextmanager
def planned_for(shapes: Shapes):
    """Launch plans chosen for ``shapes.plan_batch`` samples whatever the batch."""
    if shapes.plan_batch is None:
        yield
        return
    from .._triton import anomaly_map, cosine_distances

    real = cosine_distances.blocks

    def blocks(B, C, N, gpu=None):
        return real(shapes.plan_batch, C, N, gpu)

    cosine_distances.blocks = anomaly_map.cosine_blocks = blocks
    try:
        yield
    finally:
        cosine_distances.blocks = anomaly_map.cosine_blocks = real


def phases(op: str, shapes: Shapes, each: Callable[[str, Callable], None]) -> int:
    """Build ``op`` at ``shapes``, warm it up where it has a warm-up, and hand each phase to
    ``each(phase, run)`` in order ("forward", then "backward" where the op has one); returns
    the ideal bytes."""
    work = MAKERS[op](shapes)
    outputs = []
    with planned_for(shapes):
        if work.warmup is not None:
            work.warmup()
        each("forward", lambda: outputs.append(work.forward()))
        if work.backward is not None:
            each("backward", lambda: work.backward(outputs[0]))
    return work.ideal_bytes
