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

Levels. Each launch takes up to three levels (``forward_levels``, ``backward_levels``): the
grid's first axis runs over the programs of one level after another, and each program runs
the body of its level with that level's pointers, sizes and blocks (a branch per level; no
value crosses branches). One level is the same launch with the other slots empty.

Occupancy. On a GPU (``gpu_config``) the pixel tile and the finish's channel block shrink
(down to 16) until a launch has at least ``MIN_PROGRAMS`` programs, one per SM of an H200:
at B = 16 the deepest WRN50 level (16 x 16 pixels) runs 16-pixel tiles, 256 programs,
rather than 64 programs of 64 pixels. The interpreter keeps the largest blocks (fewer numpy
programs on test shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv, gpu_config, strides
from .launch import launch

BLOCK_N = 64  # pixels per program, the largest (the interpreter's choice)
BLOCK_C = 32
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


def blocks(B: int, C: int, N: int, gpu: bool | None = None) -> tuple[int, int]:
    """(pixels per forward/backward program, channels per finish program) for a (B, C, N)
    launch; ``gpu`` None means the configuration in force (``gpu_config``)."""
    gpu = gpu_config(INTERPRETED) if gpu is None else gpu
    return _fill(N, B, BLOCK_N, gpu), _fill(C, B, BLOCK_FIN, gpu)


@triton.jit
def _distance(dot, tt, ss, EPS: tl.constexpr):
    # Each norm is clamped separately, as F.cosine_similarity does.
    return 1.0 - dot / (tl.maximum(tl.sqrt(tt), EPS) * tl.maximum(tl.sqrt(ss), EPS))


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
    t_ptr, s_ptr, pixel_ptr, pixel_stats_ptr, partial_ptr, sample_partial_ptr, tile, b,
    C, N, W, n_tiles,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pixel tile ``tile`` of sample b of one level: its pixel sums and distances, and its
    channel and sample partial sums."""
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
    tl.store(pixel_ptr + b * N + offs_n, _distance(dot, tt, ss, EPS), mask=mask_n)
    # The tile's sample sums (masked pixels hold zeros).
    sample_part = sample_partial_ptr + (b * n_tiles + tile) * 3
    tl.store(sample_part, tl.sum(dot, axis=0))
    tl.store(sample_part + 1, tl.sum(tt, axis=0))
    tl.store(sample_part + 2, tl.sum(ss, axis=0))


@triton.jit
def _cosine_distances_fwd_kernel(
    t0, s0, pix0, pst0, part0, spart0, C0, N0, W0, T0,
    t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w,
    t1, s1, pix1, pst1, part1, spart1, C1, N1, W1, T1,
    t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w,
    t2, s2, pix2, pst2, part2, spart2, C2, N2, W2, T2,
    t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w,
    start1, start2,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    # Up to three levels in one launch (LEVELS in the module doc): grid axis 0 runs over
    # level 0's tiles (below start1), level 1's (below start2), then level 2's; axis 1 is
    # the sample. Each branch is a whole level: no value flows out of it.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _fwd_tile(t0, s0, pix0, pst0, part0, spart0, pid, b, C0, N0, W0, T0,
                  t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w, EPS, BLOCK_C, BLOCK_N0)
    elif pid < start2:
        _fwd_tile(t1, s1, pix1, pst1, part1, spart1, pid - start1, b, C1, N1, W1, T1,
                  t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w, EPS, BLOCK_C, BLOCK_N1)
    else:
        _fwd_tile(t2, s2, pix2, pst2, part2, spart2, pid - start2, b, C2, N2, W2, T2,
                  t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w, EPS, BLOCK_C, BLOCK_N2)


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
    partial_ptr, sample_partial_ptr, channel_ptr, channel_stats_ptr, sample_ptr, block, b,
    C, n_tiles, EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Channel block ``block`` of sample b of one level: the channel sums of its channels
    over all tiles; block 0 also adds the tiles' sample sums."""
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
    tl.store(channel_ptr + b * C + offs_c, _distance(dot, tt, ss, EPS), mask=mask_c)
    if block == 0:
        three = tl.arange(0, 4)
        sums = _sum_tiles(sample_partial_ptr + b * n_tiles * 3, n_tiles, 3, three, three < 3,
                          BLOCK_T, 4)
        dot_b = tl.sum(tl.where(three == 0, sums, 0.0), axis=0)
        tt_b = tl.sum(tl.where(three == 1, sums, 0.0), axis=0)
        ss_b = tl.sum(tl.where(three == 2, sums, 0.0), axis=0)
        tl.store(sample_ptr + b, _distance(dot_b, tt_b, ss_b, EPS))


@triton.jit
def _cosine_distances_fin_kernel(
    part0, spart0, ch0, cst0, smp0, C0, T0,
    part1, spart1, ch1, cst1, smp1, C1, T1,
    part2, spart2, ch2, cst2, smp2, C2, T2,
    start1, start2,
    EPS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C0: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    # Program (channel block of one of up to three levels, sample b), as the forward.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _fin_block(part0, spart0, ch0, cst0, smp0, pid, b, C0, T0, EPS, BLOCK_C0, BLOCK_T)
    elif pid < start2:
        _fin_block(part1, spart1, ch1, cst1, smp1, pid - start1, b, C1, T1, EPS, BLOCK_C1,
                   BLOCK_T)
    else:
        _fin_block(part2, spart2, ch2, cst2, smp2, pid - start2, b, C2, T2, EPS, BLOCK_C2,
                   BLOCK_T)


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
    EPS: tl.constexpr, NEED_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of pixel tile ``tile`` of sample b of one level."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    h = offs_n // W
    w = offs_n % W
    p_a, p_bs, p_bt = _coefficients_at(pixel_stats_ptr + b * 3 * N + offs_n, N,
                                       g_pixel_ptr + b * N + offs_n, mask_n, EPS)
    s_a, s_bs, s_bt = _coefficients(
        tl.load(sample_stats_ptr + b * 3),
        tl.load(sample_stats_ptr + b * 3 + 1),
        tl.load(sample_stats_ptr + b * 3 + 2),
        tl.load(g_sample_ptr + b),
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
        c_a, c_bs, c_bt = _coefficients_at(channel_stats_ptr + b * 3 * C + offs_c, C,
                                           g_channel_ptr + b * C + offs_c, mask_c, EPS)
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
    EPS: tl.constexpr, NEED_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    # Program (pixel tile of one of up to three levels, sample b), as the forward.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _bwd_tile(t0, s0, pst0, cst0, sst0, gp0, gc0, gs0, dt0, ds0, pid, b, C0, N0, W0,
                  t0_b, t0_c, t0_h, t0_w, s0_b, s0_c, s0_h, s0_w,
                  dt0_b, dt0_c, dt0_h, dt0_w, ds0_b, ds0_c, ds0_h, ds0_w,
                  EPS, NEED_T, BLOCK_C, BLOCK_N0)
    elif pid < start2:
        _bwd_tile(t1, s1, pst1, cst1, sst1, gp1, gc1, gs1, dt1, ds1, pid - start1, b,
                  C1, N1, W1, t1_b, t1_c, t1_h, t1_w, s1_b, s1_c, s1_h, s1_w,
                  dt1_b, dt1_c, dt1_h, dt1_w, ds1_b, ds1_c, ds1_h, ds1_w,
                  EPS, NEED_T, BLOCK_C, BLOCK_N1)
    else:
        _bwd_tile(t2, s2, pst2, cst2, sst2, gp2, gc2, gs2, dt2, ds2, pid - start2, b,
                  C2, N2, W2, t2_b, t2_c, t2_h, t2_w, s2_b, s2_c, s2_h, s2_w,
                  dt2_b, dt2_c, dt2_h, dt2_w, ds2_b, ds2_c, ds2_h, ds2_w,
                  EPS, NEED_T, BLOCK_C, BLOCK_N2)


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


def forward_levels(teachers: list[Tensor], students: list[Tensor], eps: float) -> list[tuple]:
    """Launch the forward of every level, up to three per launch; per level
    (pixel, channel, sample, pixel_stats, channel_stats)."""
    B = teachers[0].shape[0]
    device = teachers[0].device
    f32 = dict(device=device, dtype=torch.float32)
    outs = []
    for levels, slots in _groups(len(teachers)):
        fwd_args, fin_args, tiles, cblocks, blk = {}, {}, [], [], {}
        level_outs = {}
        for j, k in enumerate(slots):
            t, s = teachers[k], students[k]
            _, C, H, W = t.shape
            N = H * W
            block_n, block_fin = blocks(B, C, N)
            n_tiles = cdiv(N, block_n)
            if k not in level_outs:
                level_outs[k] = (
                    torch.empty((B, H, W), **f32), torch.empty((B, C), **f32),
                    torch.empty((B,), **f32), torch.empty((B, 3, N), **f32),
                    torch.empty((B, 3, C), **f32), torch.empty((B, n_tiles, 3, C), **f32),
                    torch.empty((B, n_tiles, 3), **f32))
            pixel, channel, sample, p_stats, c_stats, partial, s_partial = level_outs[k]
            real = j < len(levels)
            tiles.append(n_tiles if real else 0)
            cblocks.append(cdiv(C, block_fin) if real else 0)
            blk.update({f"BLOCK_N{j}": block_n, f"BLOCK_C{j}": block_fin})
            fwd_args.update({
                f"t{j}": t, f"s{j}": s, f"pix{j}": pixel, f"pst{j}": p_stats,
                f"part{j}": partial, f"spart{j}": s_partial, f"C{j}": C, f"N{j}": N,
                f"W{j}": W, f"T{j}": n_tiles,
                **strides(t, f"t{j}_b t{j}_c t{j}_h t{j}_w"),
                **strides(s, f"s{j}_b s{j}_c s{j}_h s{j}_w")})
            fin_args.update({
                f"part{j}": partial, f"spart{j}": s_partial, f"ch{j}": channel,
                f"cst{j}": c_stats, f"smp{j}": sample, f"C{j}": C, f"T{j}": n_tiles})
        launch(_cosine_distances_fwd_kernel, (sum(tiles), B), dict(
            **fwd_args, **_starts(tiles), EPS=eps, BLOCK_C=BLOCK_C,
            **{f"BLOCK_N{j}": blk[f"BLOCK_N{j}"] for j in range(GROUP)}))
        launch(_cosine_distances_fin_kernel, (sum(cblocks), B), dict(
            **fin_args, **_starts(cblocks), EPS=eps, BLOCK_T=BLOCK_TILES,
            **{f"BLOCK_C{j}": blk[f"BLOCK_C{j}"] for j in range(GROUP)}))
        outs += [level_outs[k][:5] for k in levels]
    return outs


def forward(teacher: Tensor, student: Tensor, eps: float):
    """Launch the forward of one level; returns (pixel, channel, sample, pixel_stats,
    channel_stats)."""
    return forward_levels([teacher], [student], eps)[0]


def backward_levels(teachers: list[Tensor], students: list[Tensor], pixel_stats: list[Tensor],
                    channel_stats: list[Tensor], grad_pixel: list[Tensor],
                    grad_channel: list[Tensor], grad_sample: list[Tensor], need_teacher: bool,
                    eps: float) -> list[tuple[Tensor, Tensor]]:
    """Launch the backward of every level, up to three per launch; per level
    (grad_teacher or an empty tensor, grad_student)."""
    B = teachers[0].shape[0]
    outs = []
    for levels, slots in _groups(len(teachers)):
        args, tiles, blk, level_outs = {}, [], {}, {}
        for j, k in enumerate(slots):
            t, s = teachers[k], students[k]
            _, C, H, W = t.shape
            N = H * W
            block_n = blocks(B, C, N)[0]
            if k not in level_outs:
                # Fixed-order reduction of (B, 3, C): deterministic, and tiny next to the
                # features.
                sample_stats = channel_stats[k].sum(dim=2).contiguous()
                grad_s = torch.empty_like(s)
                grad_t = torch.empty_like(t) if need_teacher else t.new_empty((0,))
                level_outs[k] = (sample_stats, grad_t, grad_s)
            sample_stats, grad_t, grad_s = level_outs[k]
            tiles.append(cdiv(N, block_n) if j < len(levels) else 0)
            blk[f"BLOCK_N{j}"] = block_n
            # Without the teacher's gradient dt is never written: any pointer, zero strides.
            dt_names = f"dt{j}_b dt{j}_c dt{j}_h dt{j}_w"
            dt_strides = (strides(grad_t, dt_names) if need_teacher
                          else dict.fromkeys(dt_names.split(), 0))
            args.update({
                f"t{j}": t, f"s{j}": s, f"pst{j}": pixel_stats[k], f"cst{j}": channel_stats[k],
                f"sst{j}": sample_stats, f"gp{j}": grad_pixel[k].contiguous(),
                f"gc{j}": grad_channel[k].contiguous(), f"gs{j}": grad_sample[k].contiguous(),
                f"dt{j}": grad_t if need_teacher else grad_s, f"ds{j}": grad_s,
                f"C{j}": C, f"N{j}": N, f"W{j}": W,
                **strides(t, f"t{j}_b t{j}_c t{j}_h t{j}_w"),
                **strides(s, f"s{j}_b s{j}_c s{j}_h s{j}_w"), **dt_strides,
                **strides(grad_s, f"ds{j}_b ds{j}_c ds{j}_h ds{j}_w")})
        launch(_cosine_distances_bwd_kernel, (sum(tiles), B), dict(
            **args, **_starts(tiles), EPS=eps, NEED_T=need_teacher, BLOCK_C=BLOCK_C, **blk))
        outs += [level_outs[k][1:] for k in levels]
    return outs


def backward(teacher: Tensor, student: Tensor, pixel_stats: Tensor, channel_stats: Tensor,
             grad_pixel: Tensor, grad_channel: Tensor, grad_sample: Tensor,
             need_teacher: bool, eps: float):
    """Launch the backward of one level; returns (grad_teacher or an empty tensor,
    grad_student)."""
    return backward_levels([teacher], [student], [pixel_stats], [channel_stats], [grad_pixel],
                           [grad_channel], [grad_sample], need_teacher, eps)[0]
