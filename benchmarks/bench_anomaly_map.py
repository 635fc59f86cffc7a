"""Anomaly map from the three WRN50 levels to 256x256 (sigma 4, add), at batch B and 1.

Ideal bytes: one read of T and S of every level plus the written maps and scores.
"""

from __future__ import annotations

import pytest
import torch
from harness import PROVIDERS, nbytes, provider_op, run_benchmark, skip_reason
from shapes import BATCH, IMAGE_SIZE, levels

import snl_kernels
from snl_kernels import reference


@pytest.mark.parametrize("batch", sorted({BATCH, 1}))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_anomaly_map(benchmark, copy_gbps, provider, batch):
    why = skip_reason(provider, "anomaly_map")
    if why:
        pytest.skip(why)
    teachers, students = levels(batch)
    op = provider_op(provider, reference.anomaly_map, snl_kernels.anomaly_map)
    fn = lambda: op(teachers, students, IMAGE_SIZE, 4.0, "add")
    ideal = nbytes(*teachers, *students) + 4 * batch * (IMAGE_SIZE * IMAGE_SIZE + 1)

    def check():
        got, want = fn(), reference.anomaly_map(teachers, students, IMAGE_SIZE)
        torch.testing.assert_close(got.maps, want.maps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)

    run_benchmark(benchmark, fn, ideal, copy_gbps, check)
