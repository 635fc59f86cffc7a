"""Triton kernels of ``anomaly_map``; the math is in ``snl_kernels/anomaly_map.py``.

Memory plan. Phase 1, one launch for up to three levels (deepest first in the grid, so its
long programs start first): each program reads a tile of pixels of one level's T and S over
all C once and writes the per-pixel distance into a zero-padded per-level slot of a small
(B, L, HK, WK) buffer; each level's last tile also writes the zeros of its sample's slot
outside the level's pixels (no fill of the whole buffer before). Each level's pixel
tile is chosen as in the cosine backward
(``cosine_distances.blocks``, with as many channels per step as its tile allows): on a GPU
small enough that the level alone has at least ``MIN_PROGRAMS`` programs (16-pixel tiles,
256 programs, for the deepest WRN50 level at B = 16), at most 128 pixels (the WRN50 levels
at B = 16: 1024 programs, one wave of the H200 at 8 per SM). Phase 2, one launch: each
program owns BLOCK_H rows of the output, as wide as the output up to MAX_BLOCK_W columns
(``combine_tiles``), and forms ``sum_k Mh_k[rows] @ m_k @ Mw_k[cols]^T`` with on-chip
matrix products over the padded levels, writes the tile and its maximum. The image score is
the max over the tiles' maxima (max is exact, so any order gives the same bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv, next_power_of_2, strides
from .cosine_distances import _at_pixels, _backward_channels, _channels, _distance
from .cosine_distances import blocks as cosine_blocks
from .launch import launch

BLOCK_H = 16  # output rows per combination program
BLOCK_Z = 1024  # padding zeros per step
MAX_BLOCK_W = 256  # output columns per combination program, at most
GROUP = 3  # levels per distance launch


@triton.jit
def _zero_padding(out_ptr, b, H, W, stride_ob, stride_oh, HK: tl.constexpr, WK: tl.constexpr,
                  BLOCK_Z: tl.constexpr):
    """Zeros into sample b's (HK, WK) slot of one level outside its H x W pixels."""
    for z0 in range(0, HK * WK, BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        h = z // WK
        w = z % WK
        tl.store(out_ptr + b * stride_ob + h * stride_oh + w,
                 tl.zeros([BLOCK_Z], dtype=tl.float32),
                 mask=(z < HK * WK) & ((h >= H) | (w >= W)))


@triton.jit
def _level_distance(
    t_ptr, s_ptr, out_ptr, tile, b, C, H, W, stride_ob, stride_oh,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    EPS: tl.constexpr, HK: tl.constexpr, WK: tl.constexpr, BLOCK_Z: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Distances of pixel tile ``tile`` of sample b of one level into its slot of out; the
    level's last tile also zeroes the rest of the slot."""
    offs = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs < H * W
    h = offs // W
    w = offs % W
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
    if (tile + 1) * BLOCK_P >= H * W:
        _zero_padding(out_ptr, b, H, W, stride_ob, stride_oh, HK, WK, BLOCK_Z)


@triton.jit
def _pixel_distance_kernel(
    t0, s0, o0, t1, s1, o1, t2, s2, o2,
    start1, start2,
    C0, H0, W0, C1, H1, W1, C2, H2, W2,
    stride_ob, stride_oh,
    t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w,
    t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w,
    t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w,
    EPS: tl.constexpr, HK: tl.constexpr, WK: tl.constexpr, BLOCK_Z: tl.constexpr,
    BLOCK_C0: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr,
    BLOCK_P0: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr,
):
    # Grid axis 0 runs over the tiles of the group's levels one after another (level 0's
    # tiles below start1, level 1's below start2, level 2's after); axis 1 is the sample.
    # Each branch is a whole level: no value flows out of it.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _level_distance(t0, s0, o0, pid, b, C0, H0, W0, stride_ob, stride_oh,
                        t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w,
                        EPS, HK, WK, BLOCK_Z, BLOCK_C0, BLOCK_P0)
    elif pid < start2:
        _level_distance(t1, s1, o1, pid - start1, b, C1, H1, W1, stride_ob, stride_oh,
                        t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w,
                        EPS, HK, WK, BLOCK_Z, BLOCK_C1, BLOCK_P1)
    else:
        _level_distance(t2, s2, o2, pid - start2, b, C2, H2, W2, stride_ob, stride_oh,
                        t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w,
                        EPS, HK, WK, BLOCK_Z, BLOCK_C2, BLOCK_P2)


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
    return max(16, next_power_of_2(n))


def pixel_distances(teachers: list[Tensor], students: list[Tensor], eps: float,
                    hk: int | None = None, wk: int | None = None) -> Tensor:
    """Per-level ``1 - cos over C`` into a zero-padded (B, L, HK, WK) float32 buffer."""
    B = teachers[0].shape[0]
    hk = hk or _pad(max(t.shape[2] for t in teachers))
    wk = wk or _pad(max(t.shape[3] for t in teachers))
    m = torch.empty((B, len(teachers), hk, wk), device=teachers[0].device, dtype=torch.float32)
    # Deepest level first (most channels per pixel: the longest programs start first).
    order = sorted(range(len(teachers)), key=lambda k: -teachers[k].shape[1])
    for first in range(0, len(order), GROUP):
        group = order[first:first + GROUP]
        # Fewer than GROUP levels: the last one is repeated with no tiles (never run).
        slots = group + [group[-1]] * (GROUP - len(group))
        args, tiles, block_of = {}, [], {}
        for j, level in enumerate(slots):
            t, s = teachers[level], students[level]
            _, C, H, W = t.shape
            block = cosine_blocks(B, C, H * W)[2]
            block_of.update({f"BLOCK_P{j}": block, f"BLOCK_C{j}": _backward_channels(block)})
            tiles.append(cdiv(H * W, block) if j < len(group) else 0)
            args.update({f"t{j}": t, f"s{j}": s, f"o{j}": m[:, level], f"C{j}": C, f"H{j}": H,
                         f"W{j}": W,
                         **strides(t, f"t{j}_b t{j}_c t{j}_h t{j}_w"),
                         **strides(s, f"s{j}_b s{j}_c s{j}_h s{j}_w")})
        launch(_pixel_distance_kernel, (sum(tiles), B), dict(
            **args, start1=tiles[0], start2=tiles[0] + tiles[1],
            stride_ob=m.stride(0), stride_oh=m.stride(2),
            EPS=eps, HK=hk, WK=wk, BLOCK_Z=BLOCK_Z, **block_of))
    return m


def combine_tiles(width: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_W, warps, stages) of the combination: rows of the output as wide as
    the output up to ``MAX_BLOCK_W`` pixels, so that each program forms ``Mh_k[rows] @ m_k``
    once for all its columns (32 x 32 tiles formed it again for each of 8 column tiles: 1.21
    GFLOP at 256 x 256 and B = 16 where the product takes 0.50); two stages, so that two
    8-warp programs fit an SM (256 programs at B = 16, one wave)."""
    bw = max(16, min(next_power_of_2(width), MAX_BLOCK_W))
    return BLOCK_H, bw, 8 if bw >= 256 else 4, 2


def combine(m: Tensor, mh: Tensor, mw: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """``maps[b] = sum_k mh[k] @ m[b, k] @ mw[k]^T`` and each map's maximum."""
    B, L, hk, wk = m.shape
    bh, bw, warps, stages = combine_tiles(width)
    n_h, n_w = cdiv(height, bh), cdiv(width, bw)
    maps = torch.empty((B, 1, height, width), device=m.device, dtype=torch.float32)
    tile_max = torch.empty((B, n_h * n_w), device=m.device, dtype=torch.float32)
    launch(_combine_kernel, (n_h, n_w, B), dict(
        m_ptr=m, mh_ptr=mh, mw_ptr=mw, out_ptr=maps, tile_max_ptr=tile_max,
        H=height, W=width, L=L, n_tiles_w=n_w,
        HK=hk, WK=wk, BLOCK_H=bh, BLOCK_W=bw), num_warps=warps, num_stages=stages)
    return maps, tile_max.amax(dim=1)
