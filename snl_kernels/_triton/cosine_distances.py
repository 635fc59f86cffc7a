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

from . import gpu_config, strides

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
    while block > MIN_BLOCK and triton.cdiv(n, block) * batch < MIN_PROGRAMS:
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
def _pixel_block(N, W, BLOCK: tl.constexpr):
    """Sample b (grid axis 1) and this program's BLOCK pixels (axis 0): b, the pixels' flat
    offsets, their mask, rows and columns."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return b, offs, offs < N, offs // W, offs % W


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
def _cosine_distances_fwd_kernel(
    t_ptr, s_ptr, pixel_ptr, pixel_stats_ptr, partial_ptr, sample_partial_ptr,
    C, N, W, n_tiles,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, offs_n, mask_n, h, w = _pixel_block(N, W, BLOCK_N)
    t_row = _at_pixels(t_ptr, b, h, w, stride_tb, stride_th, stride_tw)
    s_row = _at_pixels(s_ptr, b, h, w, stride_sb, stride_sh, stride_sw)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    part = partial_ptr + (b * n_tiles + tl.program_id(0)) * 3 * C
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
    sample_part = sample_partial_ptr + (b * n_tiles + tl.program_id(0)) * 3
    tl.store(sample_part, tl.sum(dot, axis=0))
    tl.store(sample_part + 1, tl.sum(tt, axis=0))
    tl.store(sample_part + 2, tl.sum(ss, axis=0))


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
def _cosine_distances_fin_kernel(
    partial_ptr, sample_partial_ptr, channel_ptr, channel_stats_ptr, sample_ptr,
    C, n_tiles,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Program (channel block, sample b): the channel sums of its channels over all tiles;
    # program (0, b) also adds the tiles' sample sums.
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
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
    if tl.program_id(0) == 0:
        three = tl.arange(0, 4)
        sums = _sum_tiles(sample_partial_ptr + b * n_tiles * 3, n_tiles, 3, three, three < 3,
                          BLOCK_T, 4)
        dot_b = tl.sum(tl.where(three == 0, sums, 0.0), axis=0)
        tt_b = tl.sum(tl.where(three == 1, sums, 0.0), axis=0)
        ss_b = tl.sum(tl.where(three == 2, sums, 0.0), axis=0)
        tl.store(sample_ptr + b, _distance(dot_b, tt_b, ss_b, EPS))


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
def _cosine_distances_bwd_kernel(
    t_ptr, s_ptr, pixel_stats_ptr, channel_stats_ptr, sample_stats_ptr,
    g_pixel_ptr, g_channel_ptr, g_sample_ptr, dt_ptr, ds_ptr,
    C, N, W,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    stride_dtb, stride_dtc, stride_dth, stride_dtw,
    stride_dsb, stride_dsc, stride_dsh, stride_dsw,
    EPS: tl.constexpr, NEED_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, offs_n, mask_n, h, w = _pixel_block(N, W, BLOCK_N)
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


INTERPRETED = not isinstance(_cosine_distances_fwd_kernel, triton.runtime.JITFunction)


def forward(teacher: Tensor, student: Tensor, eps: float):
    """Launch the forward; returns (pixel, channel, sample, pixel_stats, channel_stats)."""
    B, C, H, W = teacher.shape
    N = H * W
    block_n, block_fin = blocks(B, C, N)
    n_tiles = triton.cdiv(N, block_n)
    f32 = dict(device=teacher.device, dtype=torch.float32)
    pixel = torch.empty((B, H, W), **f32)
    channel = torch.empty((B, C), **f32)
    sample = torch.empty((B,), **f32)
    pixel_stats = torch.empty((B, 3, N), **f32)
    channel_stats = torch.empty((B, 3, C), **f32)
    partial = torch.empty((B, n_tiles, 3, C), **f32)
    sample_partial = torch.empty((B, n_tiles, 3), **f32)
    _cosine_distances_fwd_kernel[(n_tiles, B)](
        t_ptr=teacher, s_ptr=student, pixel_ptr=pixel, pixel_stats_ptr=pixel_stats,
        partial_ptr=partial, sample_partial_ptr=sample_partial, C=C, N=N, W=W,
        n_tiles=n_tiles,
        **strides(teacher, "stride_tb stride_tc stride_th stride_tw"),
        **strides(student, "stride_sb stride_sc stride_sh stride_sw"),
        EPS=eps, BLOCK_C=BLOCK_C, BLOCK_N=block_n,
    )
    _cosine_distances_fin_kernel[(triton.cdiv(C, block_fin), B)](
        partial_ptr=partial, sample_partial_ptr=sample_partial, channel_ptr=channel,
        channel_stats_ptr=channel_stats, sample_ptr=sample, C=C, n_tiles=n_tiles,
        EPS=eps, BLOCK_C=block_fin, BLOCK_T=BLOCK_TILES,
    )
    return pixel, channel, sample, pixel_stats, channel_stats


def backward(teacher: Tensor, student: Tensor, pixel_stats: Tensor, channel_stats: Tensor,
             grad_pixel: Tensor, grad_channel: Tensor, grad_sample: Tensor,
             need_teacher: bool, eps: float):
    """Launch the backward; returns (grad_teacher or an empty tensor, grad_student)."""
    B, C, H, W = teacher.shape
    N = H * W
    # Fixed-order reduction of (B, 3, C): deterministic, and tiny next to the features.
    sample_stats = channel_stats.sum(dim=2).contiguous()
    grad_student = torch.empty_like(student)
    grad_teacher = torch.empty_like(teacher) if need_teacher else teacher.new_empty((0,))
    # Without the teacher's gradient dt_ptr is never written: any pointer, zero strides.
    dt_names = "stride_dtb stride_dtc stride_dth stride_dtw"
    dt_strides = (strides(grad_teacher, dt_names) if need_teacher
                  else dict.fromkeys(dt_names.split(), 0))
    block_n = blocks(B, C, N)[0]
    _cosine_distances_bwd_kernel[(triton.cdiv(N, block_n), B)](
        t_ptr=teacher, s_ptr=student, pixel_stats_ptr=pixel_stats,
        channel_stats_ptr=channel_stats, sample_stats_ptr=sample_stats,
        g_pixel_ptr=grad_pixel.contiguous(), g_channel_ptr=grad_channel.contiguous(),
        g_sample_ptr=grad_sample.contiguous(),
        dt_ptr=grad_teacher if need_teacher else grad_student, ds_ptr=grad_student,
        C=C, N=N, W=W,
        **strides(teacher, "stride_tb stride_tc stride_th stride_tw"),
        **strides(student, "stride_sb stride_sc stride_sh stride_sw"),
        **dt_strides,
        **strides(grad_student, "stride_dsb stride_dsc stride_dsh stride_dsw"),
        EPS=eps, NEED_T=need_teacher, BLOCK_C=BLOCK_C, BLOCK_N=block_n,
    )
    return grad_teacher, grad_student
