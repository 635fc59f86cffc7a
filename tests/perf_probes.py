"""Small Triton kernels whose bytes, FLOPs and instructions are known, for showing that the
performance model's counters can fail (tests/test_perf_model.py).

Run as a script (``python tests/perf_probes.py``, TRITON_INTERPRET unset) it compiles the
probes for sm_90 through the model's recorder and prints one JSON object per launch: the
compiled kernel's instruction counts and the host time of its launch.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

N = 4096
BLOCK = 1024


@triton.jit
def copy_kernel(x_ptr, y_ptr, n, READS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x_ptr + offs, mask=mask)
    for _ in tl.static_range(READS - 1):  # the same elements again
        acc += tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, acc, mask=mask)


@triton.jit
def add_kernel(x_ptr, z_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(z_ptr + offs, mask=mask),
             mask=mask)


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, K, PRECISION: tl.constexpr, M: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, SCALE_IN_LOOP: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((M, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SCALE_IN_LOOP:  # elementwise use of the product: each group must be waited for
            acc = acc * 0.5
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


def copy(x: torch.Tensor, reads: int = 1) -> torch.Tensor:
    y = torch.empty_like(x)
    copy_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), READS=reads, BLOCK=BLOCK)
    return y


def add(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    add_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, z, y, x.numel(), BLOCK=BLOCK)
    return y


def dot(a: torch.Tensor, b: torch.Tensor, precision: str, scale_in_loop: bool = False):
    c = torch.empty((a.shape[0], b.shape[1]))
    dot_kernel[(1,)](a, b, c, a.shape[1], PRECISION=precision, M=a.shape[0], BN=b.shape[1],
                     BK=32, SCALE_IN_LOOP=scale_in_loop, num_warps=4)
    return c


def main() -> int:
    from snl_kernels.perf import compiled

    recorder = compiled.recorder()
    recorder.active = True
    a, b = torch.randn(64, 128), torch.randn(128, 64)
    for precision in ("tf32", "ieee"):
        dot(a, b, precision)
    dot(a, b, "tf32", scale_in_loop=True)
    copy(torch.randn(N))
    out = []
    for launch in recorder.launches:
        kernel = recorder.kernels[launch.key]
        out.append({"kernel": launch.kernel, "host_us": launch.host_us, "args": launch.args,
                    "hgmma": kernel.hgmma, "hmma": kernel.hmma, "ffma": kernel.ffma,
                    "widest_load_bits": kernel.widest_load_bits,
                    "waits_all_in_loop": kernel.waits_all_in_loop,
                    "local_bytes": kernel.local_bytes})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
