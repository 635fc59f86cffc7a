"""Affinity distillation at the WRN50 levels, and all SNL distillation terms together.

Ideal bytes: every affinity term must at least read T and S of the levels it uses (and,
with backward, write dS); the N x N and C_a x C_b matrices need never touch memory.

The kernel providers run twice: with the products' default precision (tensor cores: tf32
for l2, three tf32 products for l1; see ``snl_kernels.precision.dot_precision``)
and with ``SNL_DOT_PRECISION=ieee`` (full fp32), so the table shows what tensor cores buy.
"""

from __future__ import annotations

import pytest
import torch
from harness import PROVIDERS, nbytes, provider_op, run_benchmark, skip_reason, with_backward
from shapes import levels

import snl_kernels
from snl_kernels import reference

PASSES = ["fwd", "fwd+bwd"]


def _intra_all(intra):
    def run(teachers, students, distance, **kwargs):
        return sum(intra(t, s, distance, **kwargs)
                   for t, s in zip(teachers, students, strict=True))

    return run


def _inter_pairs(inter):
    def run(teachers, students, distance, **kwargs):
        return sum(inter(teachers[k], teachers[k + 1], students[k], students[k + 1], distance,
                         **kwargs) for k in range(len(teachers) - 1))

    return run


def _snl_terms(cosines, intra, inter):
    def run(teachers, students, distance, **kwargs):
        sc = cosines(teachers, students, **kwargs)
        return (sc.pixel_mean + sc.channel_mean
                + _intra_all(intra)(teachers, students, distance, **kwargs)
                + _inter_pairs(inter)(teachers, students, distance, **kwargs))

    return run


OPS = {
    "intra": (_intra_all(reference.intra_affinity_loss),
              _intra_all(snl_kernels.intra_affinity_loss), ["intra_affinity_loss"]),
    "inter": (_inter_pairs(reference.inter_affinity_loss),
              _inter_pairs(snl_kernels.inter_affinity_loss), ["inter_affinity_loss"]),
    "snl-all": (
        _snl_terms(reference.spatial_channel_loss, reference.intra_affinity_loss,
                   reference.inter_affinity_loss),
        _snl_terms(snl_kernels.spatial_channel_loss, snl_kernels.intra_affinity_loss,
                   snl_kernels.inter_affinity_loss),
        ["cosine_distances", "intra_affinity_loss", "inter_affinity_loss"],
    ),
}


@pytest.mark.parametrize("precision", ["default", "ieee"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("term", list(OPS))
def test_affinity(benchmark, copy_gbps, monkeypatch, term, provider, distance, pass_, precision):
    reference_fn, public_fn, modules = OPS[term]
    if precision != "default":
        if provider in ("eager", "compile"):
            pytest.skip("SNL_DOT_PRECISION applies to the kernel providers only")
        monkeypatch.setenv("SNL_DOT_PRECISION", precision)
    reasons = [r for m in modules for r in (skip_reason(provider, m) or "").split("; ") if r]
    why = "; ".join(dict.fromkeys(reasons))
    if why:
        pytest.skip(why)
    backward = pass_ == "fwd+bwd"
    teachers, students = levels(requires_grad=backward)
    op = provider_op(provider, reference_fn, public_fn)
    fn = lambda: op(teachers, students, distance)
    if backward:
        fn = with_backward(fn, lambda loss: loss, students)
    ideal = nbytes(*teachers, *students) + (nbytes(*students) if backward else 0)

    def check():
        want = reference_fn(teachers, students, distance)
        torch.testing.assert_close(op(teachers, students, distance), want, atol=1e-6, rtol=1e-4)

    run_benchmark(benchmark, fn, ideal, copy_gbps, check)
