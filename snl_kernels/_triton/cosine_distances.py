"""Triton kernels of ``cosine_distances``; the math is in ``snl_kernels/cosine_distances.py``.

Memory plan. Forward: one program per (tile of BLOCK_N pixels, sample b) walks all C
channels once, so each element of T and S is read exactly once. It finishes the pixel sums
itself (they reduce over C, which it owns) and writes per-tile channel partial sums and the
tile's sample sums; a second launch, one program per (block of channels, sample), adds the
partials over tiles in a fixed order (channel sums), and its first program per sample adds
the tiles' sample sums. No atomics, so the bits are the same on every run. Backward: the
same tiling, one more read of T and S and one write per requested gradient; the tiny
per-pixel, per-channel and per-sample coefficients are computed inside the kernel from the
saved sums.

Means. The fused distillation loss wants each level's three mean distances, not the
distances: ``forward_levels(means=True)`` has each forward tile also write the sum of its
pixel distances, and each finish program write its share of the three means (its channels'
distances over B * C; block 0 its sample's pixel distances over B * N and its sample
distance over B) to its own column of a (3, programs) buffer, which three sums reduce. The
backward then takes the means' 0-dim upstream gradients as they are (``of_means``) and forms
g / numel in the kernel: no broadcast, copy or division on the host.

Levels. Each launch takes up to three levels (``forward_levels``, ``backward_levels``): the
grid's first axis runs over the programs of one level after another, and each program runs
the body of its level with that level's pointers, sizes and blocks (a branch per level; no
value crosses branches). One level is the same launch with the other slots empty.

Occupancy. On a GPU (``gpu_config``) the pixel tile and the finish's channel block shrink
(down to 16) until a launch has at least ``MIN_PROGRAMS`` programs, one per SM of an H200:
at B = 16 the deepest WRN50 level (16 x 16 pixels) runs 16-pixel tiles, 256 programs,
rather than 64 programs of 64 pixels. The backward starts from 128-pixel tiles (16 channels
per step, the same registers): its programs then fit one wave of the H200 at the WRN50
levels (1024 programs, 8 per SM at 64 registers), where 64-pixel tiles (1536) leave a second
wave a third full.
The interpreter keeps the largest forward blocks (fewer numpy programs on test shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv, gpu_config, strides
from .launch import launch

BLOCK_N = 64  # pixels per program, the largest (the interpreter's choice)
BLOCK_N_BWD = 128  # pixels per backward program on a GPU, the largest
BLOCK_C = 32  # channels per step (per backward step: BLOCK_C * BLOCK_N elements in all)
BLOCK_FIN = 128  # channels per finish program, the largest
BLOCK_TILES = 32  # tiles' partial sums added per step of the finish
MIN_BLOCK = 16
#: Programs a launch should have on a GPU: the H200's 132 SMs.
MIN_PROGRAMS = 132


def _fill(n: int, batch: int, largest: int, gpu: bool) -> int:
    """The largest power-of-two block from ``largest`` down to MIN_BLOCK that gives
    ``cdiv(n, block) * batch >= MIN_PROGRAMS`` (MIN_BLOCK if none does); ``largest`` when
    not ``gpu``."""
    if not gpu:
        return largest
    block = largest
    while block > MIN_BLOCK and cdiv(n, block) * batch < MIN_PROGRAMS:
        block //= 2
    return block


def blocks(B: int, C: int, N: int, gpu: bool | None = None) -> tuple[int, int, int]:
    """(pixels per forward program, channels per finish program, pixels per backward
    program) for a (B, C, N) launch; ``gpu`` None means the configuration in force
    (``gpu_config``)."""
    gpu = gpu_config(INTERPRETED) if gpu is None else gpu
    return (_fill(N, B, BLOCK_N, gpu), _fill(C, B, BLOCK_FIN, gpu),
            _fill(N, B, BLOCK_N_BWD, gpu) if gpu else BLOCK_N)


def _backward_channels(block_n: int) -> int:
    """Channels per backward step for ``block_n`` pixels: a tile of at most
    BLOCK_C * BLOCK_N elements (registers as the forward's)."""
    return BLOCK_C * BLOCK_N // block_n if block_n > BLOCK_N else BLOCK_C


@triton.jit
def _distance(dot, tt, ss, EPS: tl.constexpr):
    # Each norm is clamped separately, as F.cosine_similarity does.
    return 1.0 - dot / (tl.maximum(tl.sqrt(tt), EPS) * tl.maximum(tl.sqrt(ss), EPS))


@triton.jit
def _inverse_norm(squares, EPS: tl.constexpr):
    """1 / max(sqrt(squares), eps), negative for an exactly zero sum (the affinity kernels'
    convention for a zero vector)."""
    r = 1.0 / tl.maximum(tl.sqrt(squares), EPS)
    return tl.where(squares == 0.0, -r, r)


@triton.jit
def _at_pixels(ptr, b, h, w, stride_b, stride_h, stride_w):
    """Pointers to channel 0 of sample b at pixels (h, w)."""
    return ptr + b * stride_b + h * stride_h + w * stride_w


@triton.jit
def _channels(at_pixels, offs_c, stride_c, mask):
    """fp32 (channels, pixels) tile: all accumulation is fp32 whatever the input dtype."""
    return tl.load(at_pixels[None, :] + offs_c[:, None] * stride_c, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _fwd_tile(
    t_ptr, s_ptr, pixel_ptr, pixel_stats_ptr, partial_ptr, sample_partial_ptr,
    norm_t_ptr, norm_s_ptr, tile, b, C, N, W, n_tiles,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    EPS: tl.constexpr, NORMS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pixel tile ``tile`` of sample b of one level: its pixel sums and distances, and its
    channel and sample partial sums; with NORMS, the pixels' inverse norms of T and S."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    h = offs_n // W
    w = offs_n % W
    t_row = _at_pixels(t_ptr, b, h, w, stride_tb, stride_th, stride_tw)
    s_row = _at_pixels(s_ptr, b, h, w, stride_sb, stride_sh, stride_sw)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    part = partial_ptr + (b * n_tiles + tile) * 3 * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_n[None, :]
        t = _channels(t_row, offs_c, stride_tc, mask)
        s = _channels(s_row, offs_c, stride_sc, mask)
        ts = t * s
        t2 = t * t
        s2 = s * s
        dot += tl.sum(ts, axis=0)
        tt += tl.sum(t2, axis=0)
        ss += tl.sum(s2, axis=0)
        tl.store(part + offs_c, tl.sum(ts, axis=1), mask=mask_c)
        tl.store(part + C + offs_c, tl.sum(t2, axis=1), mask=mask_c)
        tl.store(part + 2 * C + offs_c, tl.sum(s2, axis=1), mask=mask_c)
    stats = pixel_stats_ptr + b * 3 * N + offs_n
    tl.store(stats, dot, mask=mask_n)
    tl.store(stats + N, tt, mask=mask_n)
    tl.store(stats + 2 * N, ss, mask=mask_n)
    if NORMS:
        tl.store(norm_t_ptr + b * N + offs_n, _inverse_norm(tt, EPS), mask=mask_n)
        tl.store(norm_s_ptr + b * N + offs_n, _inverse_norm(ss, EPS), mask=mask_n)
    distance = _distance(dot, tt, ss, EPS)
    tl.store(pixel_ptr + b * N + offs_n, distance, mask=mask_n)
    # The tile's sample sums (masked pixels hold zeros) and the sum of its pixel distances
    # (masked pixels left out: their distance is 1).
    sample_part = sample_partial_ptr + (b * n_tiles + tile) * 4
    tl.store(sample_part, tl.sum(dot, axis=0))
    tl.store(sample_part + 1, tl.sum(tt, axis=0))
    tl.store(sample_part + 2, tl.sum(ss, axis=0))
    tl.store(sample_part + 3, tl.sum(tl.where(mask_n, distance, 0.0), axis=0))


@triton.jit
def _cosine_distances_fwd_kernel(
    t0, s0, pix0, pst0, part0, spart0, rt0, rs0, C0, N0, W0, T0,
    t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w,
    t1, s1, pix1, pst1, part1, spart1, rt1, rs1, C1, N1, W1, T1,
    t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w,
    t2, s2, pix2, pst2, part2, spart2, rt2, rs2, C2, N2, W2, T2,
    t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w,
    start1, start2,
    EPS: tl.constexpr, NORMS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    # Up to three levels in one launch (LEVELS in the module doc): grid axis 0 runs over
    # level 0's tiles (below start1), level 1's (below start2), then level 2's; axis 1 is
    # the sample. Each branch is a whole level: no value flows out of it.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _fwd_tile(t0, s0, pix0, pst0, part0, spart0, rt0, rs0, pid, b, C0, N0, W0, T0,
                  t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w, EPS, NORMS, BLOCK_C,
                  BLOCK_N0)
    elif pid < start2:
        _fwd_tile(t1, s1, pix1, pst1, part1, spart1, rt1, rs1, pid - start1, b, C1, N1, W1,
                  T1, t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w, EPS, NORMS, BLOCK_C,
                  BLOCK_N1)
    else:
        _fwd_tile(t2, s2, pix2, pst2, part2, spart2, rt2, rs2, pid - start2, b, C2, N2, W2,
                  T2, t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w, EPS, NORMS, BLOCK_C,
                  BLOCK_N2)


@triton.jit
def _sum_tiles(ptr, n_tiles, row, offs, mask, BLOCK_T: tl.constexpr, SIZE: tl.constexpr):
    """sum over tiles t of ptr[t * row + offs], BLOCK_T tiles at a time (fixed order)."""
    acc = tl.zeros([BLOCK_T, SIZE], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        acc += tl.load(ptr + tiles[:, None].to(tl.int64) * row + offs[None, :],
                       mask=(tiles < n_tiles)[:, None] & mask[None, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _fin_block(
    partial_ptr, sample_partial_ptr, channel_ptr, channel_stats_ptr, sample_ptr,
    sample_stats_ptr, norm_t_ptr, norm_s_ptr, terms_ptr, block, b, column, C, N, n_tiles,
    EPS: tl.constexpr, TERMS: tl.constexpr, NORMS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Channel block ``block`` of sample b of one level: the channel sums of its channels
    over all tiles; block 0 also adds the tiles' sample sums. With TERMS, the program's
    share of the three means (module doc, "Means") goes to column ``column`` of the
    (3, columns) ``terms``, and block 0 writes the sample's sums (dot, tt, ss). With NORMS,
    the channels' inverse norms of T and S."""
    offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    part = partial_ptr + b * n_tiles * 3 * C
    dot = _sum_tiles(part, n_tiles, 3 * C, offs_c, mask_c, BLOCK_T, BLOCK_C)
    tt = _sum_tiles(part + C, n_tiles, 3 * C, offs_c, mask_c, BLOCK_T, BLOCK_C)
    ss = _sum_tiles(part + 2 * C, n_tiles, 3 * C, offs_c, mask_c, BLOCK_T, BLOCK_C)
    stats = channel_stats_ptr + b * 3 * C + offs_c
    tl.store(stats, dot, mask=mask_c)
    tl.store(stats + C, tt, mask=mask_c)
    tl.store(stats + 2 * C, ss, mask=mask_c)
    if NORMS:
        tl.store(norm_t_ptr + b * C + offs_c, _inverse_norm(tt, EPS), mask=mask_c)
        tl.store(norm_s_ptr + b * C + offs_c, _inverse_norm(ss, EPS), mask=mask_c)
    distance = _distance(dot, tt, ss, EPS)
    tl.store(channel_ptr + b * C + offs_c, distance, mask=mask_c)
    batch = tl.num_programs(1)
    columns = tl.num_programs(0) * batch
    if TERMS:
        share = tl.sum(tl.where(mask_c, distance, 0.0), axis=0) / (batch * C).to(tl.float32)
        tl.store(terms_ptr + columns + column, share)
    if block == 0:
        four = tl.arange(0, 4)
        sums = _sum_tiles(sample_partial_ptr + b * n_tiles * 4, n_tiles, 4, four, four < 4,
                          BLOCK_T, 4)
        dot_b = tl.sum(tl.where(four == 0, sums, 0.0), axis=0)
        tt_b = tl.sum(tl.where(four == 1, sums, 0.0), axis=0)
        ss_b = tl.sum(tl.where(four == 2, sums, 0.0), axis=0)
        sample = _distance(dot_b, tt_b, ss_b, EPS)
        tl.store(sample_ptr + b, sample)
        if TERMS:
            pixels = tl.sum(tl.where(four == 3, sums, 0.0), axis=0)
            tl.store(terms_ptr + column, pixels / (batch * N).to(tl.float32))
            tl.store(terms_ptr + 2 * columns + column, sample / batch.to(tl.float32))
            tl.store(sample_stats_ptr + b * 3, dot_b)
            tl.store(sample_stats_ptr + b * 3 + 1, tt_b)
            tl.store(sample_stats_ptr + b * 3 + 2, ss_b)
    elif TERMS:
        tl.store(terms_ptr + column, 0.0)
        tl.store(terms_ptr + 2 * columns + column, 0.0)


@triton.jit
def _cosine_distances_fin_kernel(
    part0, spart0, ch0, cst0, smp0, sst0, rt0, rs0, C0, N0, T0,
    part1, spart1, ch1, cst1, smp1, sst1, rt1, rs1, C1, N1, T1,
    part2, spart2, ch2, cst2, smp2, sst2, rt2, rs2, C2, N2, T2,
    terms, start1, start2,
    EPS: tl.constexpr, TERMS: tl.constexpr, NORMS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C0: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    # Program (channel block of one of up to three levels, sample b), as the forward; its
    # column of ``terms`` is b * programs + pid.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    column = b * tl.num_programs(0) + pid
    if pid < start1:
        _fin_block(part0, spart0, ch0, cst0, smp0, sst0, rt0, rs0, terms, pid, b, column,
                   C0, N0, T0, EPS, TERMS, NORMS, BLOCK_C0, BLOCK_T)
    elif pid < start2:
        _fin_block(part1, spart1, ch1, cst1, smp1, sst1, rt1, rs1, terms, pid - start1, b,
                   column, C1, N1, T1, EPS, TERMS, NORMS, BLOCK_C1, BLOCK_T)
    else:
        _fin_block(part2, spart2, ch2, cst2, smp2, sst2, rt2, rs2, terms, pid - start2, b,
                   column, C2, N2, T2, EPS, TERMS, NORMS, BLOCK_C2, BLOCK_T)


@triton.jit
def _coefficients(dot, tt, ss, g, EPS: tl.constexpr):
    # d = 1 - dot / (nt ns): dd/ds = a t + bs s, dd/dt = a s + bt t. A clamped norm has zero
    # slope, so its second term drops (the where on the raw norm).
    nt_raw = tl.sqrt(tt)
    ns_raw = tl.sqrt(ss)
    nt = tl.maximum(nt_raw, EPS)
    ns = tl.maximum(ns_raw, EPS)
    inv = 1.0 / (nt * ns)
    gcos = g * dot * inv
    a = -g * inv
    bs = tl.where(ns_raw > EPS, gcos / (ns * ns), 0.0)
    bt = tl.where(nt_raw > EPS, gcos / (nt * nt), 0.0)
    return a, bs, bt


@triton.jit
def _coefficients_at(stats, stride, g, mask, EPS: tl.constexpr):
    """``_coefficients`` of the sums dot, tt, ss at stats + (0, 1, 2) stride and the upstream
    gradient at g."""
    return _coefficients(
        tl.load(stats, mask=mask, other=0.0),
        tl.load(stats + stride, mask=mask, other=0.0),
        tl.load(stats + 2 * stride, mask=mask, other=0.0),
        tl.load(g, mask=mask, other=0.0),
        EPS,
    )


@triton.jit
def _bwd_tile(
    t_ptr, s_ptr, pixel_stats_ptr, channel_stats_ptr, sample_stats_ptr,
    g_pixel_ptr, g_channel_ptr, g_sample_ptr, dt_ptr, ds_ptr, tile, b,
    C, N, W,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    stride_dtb, stride_dtc, stride_dth, stride_dtw,
    stride_dsb, stride_dsc, stride_dsh, stride_dsw,
    EPS: tl.constexpr, NEED_T: tl.constexpr, UNIFORM_G: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of pixel tile ``tile`` of sample b of one level. With UNIFORM_G the three
    upstream pointers hold one value each, the gradient of the level's mean distance (the
    mean's gradient, g / numel, is formed here)."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    h = offs_n // W
    w = offs_n % W
    pixel_stats = pixel_stats_ptr + b * 3 * N + offs_n
    if UNIFORM_G:
        batch = tl.num_programs(1)
        g_pixel = tl.load(g_pixel_ptr) / (batch * N).to(tl.float32)
        g_channel = tl.load(g_channel_ptr) / (batch * C).to(tl.float32)
        g_sample = tl.load(g_sample_ptr) / batch.to(tl.float32)
        p_a, p_bs, p_bt = _coefficients(
            tl.load(pixel_stats, mask=mask_n, other=0.0),
            tl.load(pixel_stats + N, mask=mask_n, other=0.0),
            tl.load(pixel_stats + 2 * N, mask=mask_n, other=0.0), g_pixel, EPS)
    else:
        g_sample = tl.load(g_sample_ptr + b)
        p_a, p_bs, p_bt = _coefficients_at(pixel_stats, N, g_pixel_ptr + b * N + offs_n,
                                           mask_n, EPS)
    s_a, s_bs, s_bt = _coefficients(
        tl.load(sample_stats_ptr + b * 3),
        tl.load(sample_stats_ptr + b * 3 + 1),
        tl.load(sample_stats_ptr + b * 3 + 2),
        g_sample,
        EPS,
    )
    t_row = _at_pixels(t_ptr, b, h, w, stride_tb, stride_th, stride_tw)
    s_row = _at_pixels(s_ptr, b, h, w, stride_sb, stride_sh, stride_sw)
    ds_row = _at_pixels(ds_ptr, b, h, w, stride_dsb, stride_dsh, stride_dsw)
    dt_row = _at_pixels(dt_ptr, b, h, w, stride_dtb, stride_dth, stride_dtw)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_n[None, :]
        channel_stats = channel_stats_ptr + b * 3 * C + offs_c
        if UNIFORM_G:
            c_a, c_bs, c_bt = _coefficients(
                tl.load(channel_stats, mask=mask_c, other=0.0),
                tl.load(channel_stats + C, mask=mask_c, other=0.0),
                tl.load(channel_stats + 2 * C, mask=mask_c, other=0.0), g_channel, EPS)
        else:
            c_a, c_bs, c_bt = _coefficients_at(channel_stats, C, g_channel_ptr + b * C + offs_c,
                                               mask_c, EPS)
        a = p_a[None, :] + c_a[:, None] + s_a
        t = _channels(t_row, offs_c, stride_tc, mask)
        s = _channels(s_row, offs_c, stride_sc, mask)
        grad_s = a * t + (p_bs[None, :] + c_bs[:, None] + s_bs) * s
        tl.store(ds_row[None, :] + offs_c[:, None] * stride_dsc,
                 grad_s.to(ds_ptr.dtype.element_ty), mask=mask)
        if NEED_T:
            grad_t = a * s + (p_bt[None, :] + c_bt[:, None] + s_bt) * t
            tl.store(dt_row[None, :] + offs_c[:, None] * stride_dtc,
                     grad_t.to(dt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cosine_distances_bwd_kernel(
    t0, s0, pst0, cst0, sst0, gp0, gc0, gs0, dt0, ds0, C0, N0, W0,
    t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w,
    dt0_b, dt0_c, dt0_h, dt0_w, ds0_b, ds0_c, ds0_h, ds0_w,
    t1, s1, pst1, cst1, sst1, gp1, gc1, gs1, dt1, ds1, C1, N1, W1,
    t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w,
    dt1_b, dt1_c, dt1_h, dt1_w, ds1_b, ds1_c, ds1_h, ds1_w,
    t2, s2, pst2, cst2, sst2, gp2, gc2, gs2, dt2, ds2, C2, N2, W2,
    t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w,
    dt2_b, dt2_c, dt2_h, dt2_w, ds2_b, ds2_c, ds2_h, ds2_w,
    start1, start2,
    EPS: tl.constexpr, NEED_T: tl.constexpr, UNIFORM_G: tl.constexpr,
    BLOCK_C0: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr,
    BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    # Program (pixel tile of one of up to three levels, sample b), as the forward.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _bwd_tile(t0, s0, pst0, cst0, sst0, gp0, gc0, gs0, dt0, ds0, pid, b, C0, N0, W0,
                  t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w,
                  dt0_b, dt0_c, dt0_h, dt0_w, ds0_b, ds0_c, ds0_h, ds0_w,
                  EPS, NEED_T, UNIFORM_G, BLOCK_C0, BLOCK_N0)
    elif pid < start2:
        _bwd_tile(t1, s1, pst1, cst1, sst1, gp1, gc1, gs1, dt1, ds1, pid - start1, b,
                  C1, N1, W1, t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w,
                  dt1_b, dt1_c, dt1_h, dt1_w, ds1_b, ds1_c, ds1_h, ds1_w,
                  EPS, NEED_T, UNIFORM_G, BLOCK_C1, BLOCK_N1)
    else:
        _bwd_tile(t2, s2, pst2, cst2, sst2, gp2, gc2, gs2, dt2, ds2, pid - start2, b,
                  C2, N2, W2, t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w,
                  dt2_b, dt2_c, dt2_h, dt2_w, ds2_b, ds2_c, ds2_h, ds2_w,
                  EPS, NEED_T, UNIFORM_G, BLOCK_C2, BLOCK_N2)


INTERPRETED = not isinstance(_cosine_distances_fwd_kernel, triton.runtime.JITFunction)


GROUP = 3  # levels per launch


def _groups(n: int):
    """Slices of up to GROUP levels, and each slot's level (the last repeated, with no
    programs, when fewer)."""
    for first in range(0, n, GROUP):
        levels = list(range(first, min(first + GROUP, n)))
        yield levels, levels + [levels[-1]] * (GROUP - len(levels))


def _starts(counts: list[int]) -> dict[str, int]:
    return {"start1": counts[0], "start2": counts[0] + counts[1]}


def forward_levels(teachers: list[Tensor], students: list[Tensor], eps: float,
                   means: bool = False, norms: tuple[str, ...] = ()) -> list[tuple] | tuple:
    """Launch the forward of every level, up to three per launch; per level
    (pixel, channel, sample, pixel_stats, channel_stats).

    With ``means`` or ``norms`` (a subset of "pixel", "channel") the call returns
    ``(levels, extra)``, ``extra`` a dict of what the fused loss takes besides: "means",
    ``(pixel_mean, channel_mean, sample_mean)`` summed over the levels, 0-dim (module doc,
    "Means"), and "sample_stats", per level the sample sums (B, 3) (dot, tt, ss: what the
    backward takes); "pixel_norms" and "channel_norms", per level the inverse norms of T
    and S ((B, N) and (B, C) each, negative for a zero vector)."""
    B = teachers[0].shape[0]
    device = teachers[0].device
    f32 = dict(device=device, dtype=torch.float32)
    pixel_norms, channel_norms = "pixel" in norms, "channel" in norms
    outs, sums = [], None
    extra: dict = {"sample_stats": [], "pixel_norms": [], "channel_norms": []}
    for levels, slots in _groups(len(teachers)):
        fwd_args, fin_args, tiles, cblocks, blk = {}, {}, [], [], {}
        level_outs = {}
        for j, k in enumerate(slots):
            t, s = teachers[k], students[k]
            _, C, H, W = t.shape
            N = H * W
            block_n, block_fin, _ = blocks(B, C, N)
            n_tiles = cdiv(N, block_n)
            if k not in level_outs:
                level_outs[k] = (
                    torch.empty((B, H, W), **f32), torch.empty((B, C), **f32),
                    torch.empty((B,), **f32), torch.empty((B, 3, N), **f32),
                    torch.empty((B, 3, C), **f32),
                    torch.empty((B, 3), **f32) if means else None,
                    tuple(torch.empty((B, N), **f32) for _ in range(2 * pixel_norms)),
                    tuple(torch.empty((B, C), **f32) for _ in range(2 * channel_norms)),
                    torch.empty((B, n_tiles, 3, C), **f32), torch.empty((B, n_tiles, 4), **f32))
            (pixel, channel, sample, p_stats, c_stats, s_stats, r_pix, r_chan, partial,
             s_partial) = level_outs[k]
            real = j < len(levels)
            tiles.append(n_tiles if real else 0)
            cblocks.append(cdiv(C, block_fin) if real else 0)
            blk.update({f"BLOCK_N{j}": block_n, f"BLOCK_C{j}": block_fin})
            # Outputs a launch does not write: any tensor (the sample distances).
            fwd_args.update({
                f"t{j}": t, f"s{j}": s, f"pix{j}": pixel, f"pst{j}": p_stats,
                f"part{j}": partial, f"spart{j}": s_partial,
                f"rt{j}": r_pix[0] if r_pix else sample, f"rs{j}": r_pix[1] if r_pix else sample,
                f"C{j}": C, f"N{j}": N, f"W{j}": W, f"T{j}": n_tiles,
                **strides(t, f"t{j}_b t{j}_c t{j}_h t{j}_w"),
                **strides(s, f"s{j}_b s{j}_c s{j}_h s{j}_w")})
            fin_args.update({
                f"part{j}": partial, f"spart{j}": s_partial, f"ch{j}": channel,
                f"cst{j}": c_stats, f"smp{j}": sample,
                f"sst{j}": s_stats if means else sample,
                f"rt{j}": r_chan[0] if r_chan else sample,
                f"rs{j}": r_chan[1] if r_chan else sample,
                f"C{j}": C, f"N{j}": N, f"T{j}": n_tiles})
        # Three rows (pixel, channel, sample means' shares), a column per fin program.
        terms = torch.empty((3, sum(cblocks) * B), **f32) if means else sample
        launch(_cosine_distances_fwd_kernel, (sum(tiles), B), dict(
            **fwd_args, **_starts(tiles), EPS=eps, NORMS=pixel_norms, BLOCK_C=BLOCK_C,
            **{f"BLOCK_N{j}": blk[f"BLOCK_N{j}"] for j in range(GROUP)}))
        launch(_cosine_distances_fin_kernel, (sum(cblocks), B), dict(
            **fin_args, terms=terms, **_starts(cblocks), EPS=eps, TERMS=means,
            NORMS=channel_norms, BLOCK_T=BLOCK_TILES,
            **{f"BLOCK_C{j}": blk[f"BLOCK_C{j}"] for j in range(GROUP)}))
        for k in levels:
            outs.append(level_outs[k][:5])
            extra["sample_stats"].append(level_outs[k][5])
            extra["pixel_norms"].append(level_outs[k][6] or None)
            extra["channel_norms"].append(level_outs[k][7] or None)
        if means:
            # Three separate sums: one (3,) sum would make the terms views of one tensor,
            # which autograd does not let a caller modify in place.
            group = tuple(row.sum() for row in terms)
            sums = group if sums is None else tuple(a + b for a, b in zip(sums, group,
                                                                          strict=True))
    if not (means or norms):
        return outs
    extra["means"] = sums
    return outs, extra


def forward(teacher: Tensor, student: Tensor, eps: float):
    """Launch the forward of one level; returns (pixel, channel, sample, pixel_stats,
    channel_stats)."""
    return forward_levels([teacher], [student], eps)[0]


def backward_levels(teachers: list[Tensor], students: list[Tensor], pixel_stats: list[Tensor],
                    channel_stats: list[Tensor], grad_pixel: list[Tensor],
                    grad_channel: list[Tensor], grad_sample: list[Tensor], need_teacher: bool,
                    eps: float, sample_stats: list[Tensor] | None = None,
                    of_means: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Launch the backward of every level, up to three per launch; per level
    (grad_teacher or an empty tensor, grad_student). ``sample_stats``: the forward's sample
    sums (``forward_levels(means=True)``), else formed from ``channel_stats``. ``of_means``:
    the upstream gradients are 0-dim, those of each level's three mean distances (the
    kernel spreads them as g / numel); else those of the distances themselves."""
    B = teachers[0].shape[0]
    outs = []
    for levels, slots in _groups(len(teachers)):
        args, tiles, blk, level_outs = {}, [], {}, {}
        for j, k in enumerate(slots):
            t, s = teachers[k], students[k]
            _, C, H, W = t.shape
            N = H * W
            block_n = blocks(B, C, N)[2]
            if k not in level_outs:
                # Fixed-order reduction of (B, 3, C): deterministic, and tiny next to the
                # features.
                s_stats = (channel_stats[k].sum(dim=2).contiguous() if sample_stats is None
                           else sample_stats[k])
                grad_s = torch.empty_like(s)
                grad_t = torch.empty_like(t) if need_teacher else t.new_empty((0,))
                level_outs[k] = (s_stats, grad_t, grad_s)
            s_stats, grad_t, grad_s = level_outs[k]
            tiles.append(cdiv(N, block_n) if j < len(levels) else 0)
            blk.update({f"BLOCK_N{j}": block_n, f"BLOCK_C{j}": _backward_channels(block_n)})
            # Without the teacher's gradient dt is never written: any pointer, zero strides.
            dt_names = f"dt{j}_b dt{j}_c dt{j}_h dt{j}_w"
            dt_strides = (strides(grad_t, dt_names) if need_teacher
                          else dict.fromkeys(dt_names.split(), 0))
            args.update({
                f"t{j}": t, f"s{j}": s, f"pst{j}": pixel_stats[k], f"cst{j}": channel_stats[k],
                f"sst{j}": s_stats, **_upstream(j, grad_pixel[k], grad_channel[k],
                                                grad_sample[k], of_means),
                f"dt{j}": grad_t if need_teacher else grad_s, f"ds{j}": grad_s,
                f"C{j}": C, f"N{j}": N, f"W{j}": W,
                **strides(t, f"t{j}_b t{j}_c t{j}_h t{j}_w"),
                **strides(s, f"s{j}_b s{j}_c s{j}_h s{j}_w"), **dt_strides,
                **strides(grad_s, f"ds{j}_b ds{j}_c ds{j}_h ds{j}_w")})
        launch(_cosine_distances_bwd_kernel, (sum(tiles), B), dict(
            **args, **_starts(tiles), EPS=eps, NEED_T=need_teacher, UNIFORM_G=of_means, **blk))
        outs += [level_outs[k][1:] for k in levels]
    return outs


def _upstream(j: int, pixel: Tensor, channel: Tensor, sample: Tensor,
              of_means: bool) -> dict[str, Tensor]:
    """Slot j's upstream gradient arguments: the 0-dim gradients of the means as they are,
    the distances' gradients contiguous."""
    if of_means:
        return {f"gp{j}": pixel, f"gc{j}": channel, f"gs{j}": sample}
    return {f"gp{j}": pixel.contiguous(), f"gc{j}": channel.contiguous(),
            f"gs{j}": sample.contiguous()}


def backward(teacher: Tensor, student: Tensor, pixel_stats: Tensor, channel_stats: Tensor,
             grad_pixel: Tensor, grad_channel: Tensor, grad_sample: Tensor,
             need_teacher: bool, eps: float):
    """Launch the backward of one level; returns (grad_teacher or an empty tensor,
    grad_student)."""
    return backward_levels([teacher], [student], [pixel_stats], [channel_stats], [grad_pixel],
                           [grad_channel], [grad_sample], need_teacher, eps)[0]
