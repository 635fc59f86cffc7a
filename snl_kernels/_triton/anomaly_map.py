"""Triton kernels of ``anomaly_map``; the math is in ``snl_kernels/anomaly_map.py``.

Memory plan. Phase 1, one launch per level: each program reads a tile of pixels of T and S
over all C once and writes the per-pixel distance into a zero-padded per-level slot of a
small (B, L, HK, WK) buffer. Phase 2, one launch: each program owns a BLOCK_H x BLOCK_W
tile of the output and forms ``sum_k Mh_k[rows] @ m_k @ Mw_k[cols]^T`` with on-chip
matrix products over the padded levels, writes the tile and its maximum. The image score is
the max over the tiles' maxima (max is exact, so any order gives the same bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import strides
from .cosine_distances import _at_pixels, _channels, _distance, _pixel_block

# The same blocks in both configurations (see ``gpu_config`` in ``__init__.py``).
BLOCK_P = 64
BLOCK_C = 32
BLOCK_H = 32
BLOCK_W = 32


@triton.jit
def _pixel_distance_kernel(
    t_ptr, s_ptr, out_ptr,
    C, H, W, stride_ob, stride_oh,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, _, mask_p, h, w = _pixel_block(H * W, W, BLOCK_P)
    t_row = _at_pixels(t_ptr, b, h, w, stride_tb, stride_th, stride_tw)
    s_row = _at_pixels(s_ptr, b, h, w, stride_sb, stride_sh, stride_sw)
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    tt = tl.zeros([BLOCK_P], dtype=tl.float32)
    ss = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c < C)[:, None] & mask_p[None, :]
        t = _channels(t_row, offs_c, stride_tc, mask)
        s = _channels(s_row, offs_c, stride_sc, mask)
        dot += tl.sum(t * s, axis=0)
        tt += tl.sum(t * t, axis=0)
        ss += tl.sum(s * s, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + w, _distance(dot, tt, ss, EPS), mask=mask_p)


@triton.jit
def _combine_kernel(
    m_ptr, mh_ptr, mw_ptr, out_ptr, tile_max_ptr,
    H, W, L, n_tiles_w,
    HK: tl.constexpr, WK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_w = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    kh = tl.arange(0, HK)
    kw = tl.arange(0, WK)
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for level in range(0, L):
        # Padded rows/columns of the operators are zero, so padding never leaks into the map.
        mh = tl.load(mh_ptr + (level * H + rows[:, None]) * HK + kh[None, :],
                     mask=(rows < H)[:, None], other=0.0)
        m = tl.load(m_ptr + ((b * L + level) * HK + kh[:, None]) * WK + kw[None, :])
        mwt = tl.load(mw_ptr + (level * W + cols[None, :]) * WK + kw[:, None],
                      mask=(cols < W)[None, :], other=0.0)
        # ieee: fp32 products, no tf32 rounding of the distances or the operators.
        rows_m = tl.dot(mh, m, input_precision="ieee")
        acc += tl.dot(rows_m, mwt, input_precision="ieee")
    mask = (rows < H)[:, None] & (cols < W)[None, :]
    tl.store(out_ptr + (b * H + rows[:, None]) * W + cols[None, :], acc, mask=mask)
    tile_max = tl.max(tl.max(tl.where(mask, acc, float("-inf")), axis=1), axis=0)
    tl.store(tile_max_ptr + b * tl.num_programs(0) * n_tiles_w + pid_h * n_tiles_w + pid_w,
             tile_max)


def _pad(n: int) -> int:
    # tl.dot needs every dimension >= 16 and a power of two.
    return max(16, triton.next_power_of_2(n))


def pixel_distances(teachers: list[Tensor], students: list[Tensor], eps: float,
                    hk: int | None = None, wk: int | None = None) -> Tensor:
    """Per-level ``1 - cos over C`` into a zero-padded (B, L, HK, WK) float32 buffer."""
    B = teachers[0].shape[0]
    hk = hk or _pad(max(t.shape[2] for t in teachers))
    wk = wk or _pad(max(t.shape[3] for t in teachers))
    m = torch.zeros((B, len(teachers), hk, wk), device=teachers[0].device, dtype=torch.float32)
    for level, (t, s) in enumerate(zip(teachers, students, strict=True)):
        _, C, H, W = t.shape
        out = m[:, level]
        _pixel_distance_kernel[(triton.cdiv(H * W, BLOCK_P), B)](
            t_ptr=t, s_ptr=s, out_ptr=out, C=C, H=H, W=W,
            stride_ob=out.stride(0), stride_oh=out.stride(1),
            **strides(t, "stride_tb stride_tc stride_th stride_tw"),
            **strides(s, "stride_sb stride_sc stride_sh stride_sw"),
            EPS=eps, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
        )
    return m


def combine(m: Tensor, mh: Tensor, mw: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """``maps[b] = sum_k mh[k] @ m[b, k] @ mw[k]^T`` and each map's maximum."""
    B, L, hk, wk = m.shape
    n_h, n_w = triton.cdiv(height, BLOCK_H), triton.cdiv(width, BLOCK_W)
    maps = torch.empty((B, 1, height, width), device=m.device, dtype=torch.float32)
    tile_max = torch.empty((B, n_h * n_w), device=m.device, dtype=torch.float32)
    _combine_kernel[(n_h, n_w, B)](
        m_ptr=m, mh_ptr=mh, mw_ptr=mw, out_ptr=maps, tile_max_ptr=tile_max,
        H=height, W=width, L=L, n_tiles_w=n_w,
        HK=hk, WK=wk, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
    )
    return maps, tile_max.amax(dim=1)
