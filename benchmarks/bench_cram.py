"""CRAM at the WRN50 bottleneck: D=2048, 8x8, K=64, at the benchmark batch and at batch 1."""

from __future__ import annotations

import pytest
import torch
from harness import PROVIDERS, nbytes, provider_op, run_benchmark, skip_reason, with_backward
from shapes import BATCH, CRAM_SHAPE, DEVICE

import snl_kernels
from snl_kernels import reference


def _loss(out):
    return out.central.square().mean() + out.assign.mean() + out.compact.mean()


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", sorted({BATCH, 1}))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cram(benchmark, copy_gbps, provider, batch, pass_):
    why = skip_reason(provider, "cram")
    if why:
        pytest.skip(why)
    backward = pass_ == "fwd+bwd"
    d, h, w, k = CRAM_SHAPE["D"], CRAM_SHAPE["h"], CRAM_SHAPE["w"], CRAM_SHAPE["K"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    embedding = torch.randn((batch, d, h, w), generator=g, device=DEVICE)
    centers = torch.randn((k, d), generator=g, device=DEVICE)
    log_tau = torch.tensor(float(d) ** 0.5, device=DEVICE).log()
    params = [embedding, centers, log_tau]
    for p in params:
        p.requires_grad_(backward)
    op = provider_op(provider, reference.cram, snl_kernels.cram)
    fn = lambda: op(embedding, centers, log_tau)
    if backward:
        fn = with_backward(fn, _loss, params)
    outs = 4 * batch * h * w * (d + k + 1)
    ideal = nbytes(embedding, centers) + outs + (nbytes(embedding, centers) if backward else 0)

    def check():
        for a, b in zip(op(embedding, centers, log_tau),
                        reference.cram(embedding, centers, log_tau), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    run_benchmark(benchmark, fn, ideal, copy_gbps, check)
