"""Benchmark shapes: the WRN50 feature levels of DESIGN §3 at 256x256 input.

On a GPU the batch is 16 as in DESIGN §3. On a CPU the batch defaults to 2 so that a run
finishes in minutes (eager affinity at B=16 materialises gigabytes); ``SNL_BENCH_BATCH``
overrides either.
"""

from __future__ import annotations

import os

import torch

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
BATCH = int(os.environ.get("SNL_BENCH_BATCH", "16" if HAS_GPU else "2"))

# (C, H, W) of the three teacher levels of wide_resnet50_2 at 256x256.
WRN50_LEVELS = ((256, 64, 64), (512, 32, 32), (1024, 16, 16))
# CRAM's bottleneck embedding and centres: D=2048 at 8x8, K=64.
CRAM_SHAPE = {"D": 2048, "h": 8, "w": 8, "K": 64}
IMAGE_SIZE = 256


def levels(batch: int = BATCH, dtype: torch.dtype = torch.float32, requires_grad: bool = False,
           seed: int = 0):
    """Teacher and student features of the three levels (students may require grad)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    teachers, students = [], []
    for c, h, w in WRN50_LEVELS:
        t = torch.randn((batch, c, h, w), generator=g, device=DEVICE, dtype=dtype)
        s = (t + 0.5 * torch.randn(t.shape, generator=g, device=DEVICE, dtype=dtype))
        teachers.append(t)
        students.append(s.requires_grad_(requires_grad))
    return teachers, students
