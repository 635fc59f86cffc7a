"""cosine_distances over the three WRN50 levels: forward, and forward + backward.

Ideal bytes (DESIGN §3): forward reads T and S once and writes the three distances;
forward + backward also writes dS (the teacher is frozen, so no dT).
"""

from __future__ import annotations

import pytest
import torch
from harness import PROVIDERS, nbytes, provider_op, run_benchmark, skip_reason, with_backward
from shapes import levels

import snl_kernels
from snl_kernels import reference


def _all_levels(op):
    def run(teachers, students, **kwargs):
        return [op(t, s, **kwargs) for t, s in zip(teachers, students, strict=True)]

    return run


def _loss(outs):
    # Upstream gradient on all three distances of every level.
    return sum(d.pixel.mean() + d.channel.mean() + d.sample.mean() for d in outs)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cosine_distances(benchmark, copy_gbps, provider, pass_):
    why = skip_reason(provider, "cosine_distances")
    if why:
        pytest.skip(why)
    backward = pass_ == "fwd+bwd"
    teachers, students = levels(requires_grad=backward)
    op = provider_op(provider, _all_levels(reference.cosine_distances),
                     _all_levels(snl_kernels.cosine_distances))
    out_bytes = sum(4 * (t.shape[0] * (t.shape[2] * t.shape[3] + t.shape[1] + 1))
                    for t in teachers)
    ideal = nbytes(*teachers, *students) + out_bytes + (nbytes(*students) if backward else 0)

    fn = lambda: op(teachers, students)
    if backward:
        fn = with_backward(fn, _loss, students)

    def check():
        got = op(teachers, students)
        want = _all_levels(reference.cosine_distances)(teachers, students)
        for g, w in zip(got, want, strict=True):
            for a, b in zip(g, w, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    run_benchmark(benchmark, fn, ideal, copy_gbps, check)
