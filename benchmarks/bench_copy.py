"""The bandwidth ceiling: a device-to-device copy of 1 GiB (256 MiB on a CPU)."""

import torch
from harness import run_benchmark
from shapes import DEVICE, HAS_GPU


def test_copy(benchmark, copy_gbps):
    n = (1 << 30 if HAS_GPU else 1 << 28) // 4
    src = torch.ones(n, device=DEVICE)
    dst = torch.empty_like(src)

    def check():
        dst.copy_(src)
        assert torch.equal(dst, src)

    run_benchmark(benchmark, lambda: dst.copy_(src), 2 * n * 4, copy_gbps, check)
