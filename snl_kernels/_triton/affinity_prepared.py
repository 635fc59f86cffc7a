"""Intra-affinity l1 at "tf32x3" from prepared operands: the loss's Delta tiles and the
backward's products with the sign bits.

Hopper's wgmma runs asynchronously (the loads of the next K step in flight while the tensor
cores work) only when a product's second operand comes straight from memory and each
product has an accumulator of its own (DESIGN §2.2). At "tf32x3" the operands of
``_delta_tile`` are split into high and low tf32 parts in registers and six products chain
into one accumulator, so every K step waits for its products: on sm_90 the l1 forward's
loop compiles with a wait per step, and at WRN50 level 1 it is the largest launch of the
loss.

Here one launch per level first writes the operands, already normalised, split and in the
layout the products read (K contiguous), for each sample a (N, 3C) matrix in two parts
``hi = tf32(x)`` and ``lo = tf32(x - hi)``:

    columns [0, C):   X_S   (the student's normalised pixels)
    columns [C, 2C):  D = X_S - X_T
    columns [2C, 3C): X_T

The difference form of ``_delta_tile``, ``-(A_S (B_S - B_T)^T + (A_S - A_T) B_T^T)``, is one
product over K = 2C: the rows of columns [0, 2C) against the rows of columns [C, 3C). The
operands are the values ``_delta_tile`` forms (the same fp32 operations, split the same
way); only the order of the sums differs, in three accumulators (lo x hi, hi x lo, hi x hi)
added at the end. Where the student equals the teacher, D and the second half of the first
operand are exactly 0, so Delta is exactly 0, as before.

The backward's products G X (G = sign(Delta) from the forward's bits, exact in tf32; X the
normalised student's, and the teacher's where it requires a gradient) take X's two parts
as their second operand, prepared the same way in the layout those products read (pixels
contiguous, (B, 2C, N): the student's channels, then the teacher's), one accumulator per
part and feature.

Memory: two fp32 (B, N, 3C) tensors per level while its forward launch runs (403 MB at
WRN50 level 1, B = 16), two (B, 2C, N) ones while its backward runs; the bytes: the features
read once more and those written and read back: predicted 0.19 ms at that level, 0.34 ms
over the three levels (the performance model, H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv, strides
from .affinity_tiles import (
    BLOCK_K,
    _delta_finish,
    _inv_norm_of,
    _norms,
    _pow2,
    _sign_tile,
    _tf32,
    _tile,
    _tiles,
)
from .launch import launch

#: Pixels x channels per program of the preparation.
PREPARE_PIXELS, PREPARE_CHANNELS = 64, 32


@triton.jit
def _store_split(hi_ptr, lo_ptr, off, x, mask):
    hi = _tf32(x)
    tl.store(hi_ptr + off, hi, mask=mask)
    tl.store(lo_ptr + off, _tf32(x - hi), mask=mask)


@triton.jit
def _prepare_kernel(s_ptr, t_ptr, rs_ptr, rt_ptr, hi_ptr, lo_ptr, N, C, W,
                    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
                    ROWS: tl.constexpr, TEACHER: tl.constexpr, BP: tl.constexpr,
                    BC: tl.constexpr):
    # Grid (pixel blocks, channel blocks, samples). ROWS: X_S, D, X_T of a block, split,
    # into (B, N, 3C); else X_S and (TEACHER) X_T into (B, 2C, N).
    b = tl.program_id(2).to(tl.int64)
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    r_s, r_t = _norms(rs_ptr, rt_ptr, b, rp, N)
    x_s = _tile(s_ptr + b * s_b, rp, cs, N, C, W, s_c, s_h, s_w, True) * r_s[:, None]
    mask = (rp < N)[:, None] & (cs < C)[None, :]
    if ROWS:
        x_t = _tile(t_ptr + b * t_b, rp, cs, N, C, W, t_c, t_h, t_w, True) * r_t[:, None]
        off = (b * N + rp[:, None]) * (3 * C) + cs[None, :]
        _store_split(hi_ptr, lo_ptr, off, x_s, mask)
        _store_split(hi_ptr, lo_ptr, off + C, x_s - x_t, mask)
        _store_split(hi_ptr, lo_ptr, off + 2 * C, x_t, mask)
    else:
        off = (b * 2 * C + cs[None, :]) * N + rp[:, None]
        _store_split(hi_ptr, lo_ptr, off, x_s, mask)
        if TEACHER:
            x_t = _tile(t_ptr + b * t_b, rp, cs, N, C, W, t_c, t_h, t_w, True) * r_t[:, None]
            _store_split(hi_ptr, lo_ptr, off + C * N, x_t, mask)


@triton.jit
def _delta_prepared_kernel(hi_ptr, lo_ptr, rs_ptr, rt_ptr, out_ptr, sign_ptr, N, C, WORDS,
                           WRITE_SIGNS: tl.constexpr, BITS: tl.constexpr, BI: tl.constexpr,
                           BJ: tl.constexpr, BK: tl.constexpr):
    # Grid (row tiles, column tiles, samples); tiles below the diagonal do nothing (Delta
    # is symmetric), as in _delta_tile.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = pid_i * BI + tl.arange(0, BI)
    rj = pid_j * BJ + tl.arange(0, BJ)
    k_end = tl.where(pid_j >= pid_i, 2 * C, 0)
    r_si, r_ti = _norms(rs_ptr, rt_ptr, b, ri, N)
    r_sj, r_tj = _norms(rs_ptr, rt_ptr, b, rj, N)
    lo_hi = tl.zeros([BI, BJ], dtype=tl.float32)
    hi_lo = tl.zeros([BI, BJ], dtype=tl.float32)
    hi_hi = tl.zeros([BI, BJ], dtype=tl.float32)
    base = b * N * (3 * C)
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        a_off = base + ri[:, None] * (3 * C) + ks[None, :]
        a_mask = (ri < N)[:, None] & (ks < 2 * C)[None, :]
        b_off = base + rj[None, :] * (3 * C) + (C + ks)[:, None]
        b_mask = (ks < 2 * C)[:, None] & (rj < N)[None, :]
        a_hi = tl.load(hi_ptr + a_off, mask=a_mask, other=0.0)
        a_lo = tl.load(lo_ptr + a_off, mask=a_mask, other=0.0)
        b_hi = tl.load(hi_ptr + b_off, mask=b_mask, other=0.0)
        b_lo = tl.load(lo_ptr + b_off, mask=b_mask, other=0.0)
        lo_hi = tl.dot(a_lo, b_hi, lo_hi, input_precision="tf32")
        hi_lo = tl.dot(a_hi, b_lo, hi_lo, input_precision="tf32")
        hi_hi = tl.dot(a_hi, b_hi, hi_hi, input_precision="tf32")
    delta = -((lo_hi + hi_lo) + hi_hi)
    _delta_finish(delta, r_si, r_ti, r_sj, r_tj, ri, rj, pid_i, pid_j, b, tl.num_programs(0),
                  tl.num_programs(1), N, N, WORDS, out_ptr, out_ptr, 0.0, sign_ptr, True,
                  False, True, WRITE_SIGNS, BITS, BI, BJ, "tf32x3")


@triton.jit
def _grad_prepared_kernel(hi_ptr, lo_ptr, rs_ptr, rt_ptr, gs_ptr, gt_ptr, g_ptr, coef,
                          sign_ptr, N, C, WORDS, TEACHER: tl.constexpr, BI: tl.constexpr,
                          BJ: tl.constexpr, BC: tl.constexpr):
    # Grid (pixel tiles, channel blocks, samples): dX^T[i, c] = -+2 coef g sum_j G[i, j]
    # X^T[j, c], as _intra_tiled_grad_tile with sign bits (BI: the forward's tile).
    b = tl.program_id(2).to(tl.int64)
    ri = tl.program_id(0) * BI + tl.arange(0, BI)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    r_si, r_ti = _norms(rs_ptr, rt_ptr, b, ri, N)
    s_hi = tl.zeros([BI, BC], dtype=tl.float32)
    s_lo = tl.zeros([BI, BC], dtype=tl.float32)
    t_hi = tl.zeros([BI, BC], dtype=tl.float32)
    t_lo = tl.zeros([BI, BC], dtype=tl.float32)
    for j0 in range(0, N, BJ):
        rj = j0 + tl.arange(0, BJ)
        r_sj, r_tj = _norms(rs_ptr, rt_ptr, b, rj, N)
        gd = _sign_tile(sign_ptr, ri, rj, b, N, WORDS, r_si, r_ti, r_sj, r_tj, BI)
        off = (b * 2 * C + cs[None, :]) * N + rj[:, None]
        mask = (rj < N)[:, None] & (cs < C)[None, :]
        s_lo = tl.dot(gd, tl.load(lo_ptr + off, mask=mask, other=0.0), s_lo,
                      input_precision="tf32")
        s_hi = tl.dot(gd, tl.load(hi_ptr + off, mask=mask, other=0.0), s_hi,
                      input_precision="tf32")
        if TEACHER:
            t_lo = tl.dot(gd, tl.load(lo_ptr + off + C * N, mask=mask, other=0.0), t_lo,
                          input_precision="tf32")
            t_hi = tl.dot(gd, tl.load(hi_ptr + off + C * N, mask=mask, other=0.0), t_hi,
                          input_precision="tf32")
    scale = tl.load(g_ptr) * coef
    mask = (ri < N)[:, None] & (cs < C)[None, :]
    off = (b * C + cs[None, :]) * N + ri[:, None]
    tl.store(gs_ptr + off, -scale * (s_lo + s_hi), mask=mask)
    if TEACHER:
        tl.store(gt_ptr + off, scale * (t_lo + t_hi), mask=mask)


@triton.jit
def _inter_prepare_kernel(qs_ptr, qt_ptr, rqs_ptr, rqt_ptr, hi_ptr, lo_ptr, C, N, W,
                          s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
                          EPS: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    # Grid (channel blocks, samples); BN >= N: a program holds whole channel rows, so the
    # level is read once. The rows' inverse norms as _inv_norm_kernel writes them (negative
    # for a zero row), and per sample the (2C, N) matrix [D_Q; Q^_T] (D_Q = Q^_S - Q^_T),
    # split into tf32 parts, pixels contiguous.
    b = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BC + tl.arange(0, BC)
    ns = tl.arange(0, BN)
    q_s = _tile(qs_ptr + b * s_b, cs, ns, C, N, W, s_c, s_h, s_w, False)
    q_t = _tile(qt_ptr + b * t_b, cs, ns, C, N, W, t_c, t_h, t_w, False)
    r_s = _inv_norm_of(q_s, EPS, 1)
    r_t = _inv_norm_of(q_t, EPS, 1)
    tl.store(rqs_ptr + b * C + cs, r_s, mask=cs < C)
    tl.store(rqt_ptr + b * C + cs, r_t, mask=cs < C)
    x_s = q_s * r_s[:, None]
    x_t = q_t * r_t[:, None]
    mask = (cs < C)[:, None] & (ns < N)[None, :]
    off = (b * 2 * C + cs[:, None]) * N + ns[None, :]
    _store_split(hi_ptr, lo_ptr, off, x_s - x_t, mask)
    _store_split(hi_ptr, lo_ptr, off + C * N, x_t, mask)


@triton.jit
def _split_dots(a, b_hi, b_lo, lo_hi, hi_lo, hi_hi):
    """The three tf32x3 products of a (made in registers, split here) with b's stored parts,
    each into its own accumulator."""
    a_hi = _tf32(a)
    lo_hi = tl.dot(_tf32(a - a_hi), b_hi, lo_hi, input_precision="tf32")
    hi_lo = tl.dot(a_hi, b_lo, hi_lo, input_precision="tf32")
    hi_hi = tl.dot(a_hi, b_hi, hi_hi, input_precision="tf32")
    return lo_hi, hi_lo, hi_hi


@triton.jit
def _inter_delta_prepared_kernel(ps_ptr, pt_ptr, rps_ptr, rpt_ptr, hi_ptr, lo_ptr, rqs_ptr,
                                 rqt_ptr, out_ptr, sign_ptr, Ra, Rb, K, W, WORDS,
                                 ps_b, ps_c, ps_h, ps_w, pt_b, pt_c, pt_h, pt_w,
                                 WRITE_SIGNS: tl.constexpr, BITS: tl.constexpr,
                                 BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    # Grid (row tiles, column tiles, samples): Delta = -(P^_S D_Q^T + D_P Q^_T^T) at tf32x3
    # (inter-affinity l1), the pooled level's rows made and split in registers (the first
    # operand), level b's parts read as _inter_prepare_kernel stored them (the second), a
    # loop per term and an accumulator per kind of product: no wait for the products.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = pid_i * BI + tl.arange(0, BI)
    rj = pid_j * BJ + tl.arange(0, BJ)
    r_as, r_at = _norms(rps_ptr, rpt_ptr, b, ri, Ra)
    r_bs, r_bt = _norms(rqs_ptr, rqt_ptr, b, rj, Rb)
    lo_hi = tl.zeros([BI, BJ], dtype=tl.float32)
    hi_lo = tl.zeros([BI, BJ], dtype=tl.float32)
    hi_hi = tl.zeros([BI, BJ], dtype=tl.float32)
    base = b * 2 * Rb * K
    b_mask_j = (rj < Rb)[None, :]
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = _tile(ps_ptr + b * ps_b, ri, ks, Ra, K, W, ps_c, ps_h, ps_w, False) * r_as[:, None]
        off = base + rj[None, :] * K + ks[:, None]
        mask = (ks < K)[:, None] & b_mask_j
        lo_hi, hi_lo, hi_hi = _split_dots(a, tl.load(hi_ptr + off, mask=mask, other=0.0),
                                          tl.load(lo_ptr + off, mask=mask, other=0.0),
                                          lo_hi, hi_lo, hi_hi)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a_s = _tile(ps_ptr + b * ps_b, ri, ks, Ra, K, W, ps_c, ps_h, ps_w, False) * r_as[:, None]
        a_t = _tile(pt_ptr + b * pt_b, ri, ks, Ra, K, W, pt_c, pt_h, pt_w, False) * r_at[:, None]
        off = base + (Rb + rj[None, :]) * K + ks[:, None]
        mask = (ks < K)[:, None] & b_mask_j
        lo_hi, hi_lo, hi_hi = _split_dots(a_s - a_t, tl.load(hi_ptr + off, mask=mask, other=0.0),
                                          tl.load(lo_ptr + off, mask=mask, other=0.0),
                                          lo_hi, hi_lo, hi_hi)
    delta = -((lo_hi + hi_lo) + hi_hi)
    _delta_finish(delta, r_as, r_at, r_bs, r_bt, ri, rj, pid_i, pid_j, b, tl.num_programs(0),
                  tl.num_programs(1), Ra, Rb, WORDS, out_ptr, out_ptr, 1.0, sign_ptr, True,
                  False, False, WRITE_SIGNS, BITS, BI, BJ, "tf32x3")


def applies(job: dict) -> bool:
    """Whether a ``delta_group`` job is an intra-affinity l1 loss at "tf32x3" (this path)."""
    return (job["pix_rows"] and job["l1"] and job["precision"] == "tf32x3"
            and job.get("grad") is None and job["a_s"] is job["b_s"]
            and job["a_t"] is job["b_t"] and job["r_as"] is job["r_bs"]
            and job["r_at"] is job["r_bt"])


def grad_applies(job: dict) -> bool:
    """Whether an ``intra_tiled_grad_group`` job is l1 at "tf32x3" from sign bits."""
    return job["l1"] and job["precision"] == "tf32x3" and job.get("signs") is not None


def prepare(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, rows: bool = True,
            teacher: bool = True) -> tuple[Tensor, Tensor]:
    """The fp32 high and low parts of [X_S, X_S - X_T, X_T] as (B, N, 3C) (``rows``), or of
    [X_S, X_T] as (B, 2C, N) (the teacher's half left unwritten without ``teacher``)."""
    B, C, H, W = s.shape
    N = H * W
    shape = (B, N, 3 * C) if rows else (B, 2 * C, N)
    hi = torch.empty(shape, device=s.device, dtype=torch.float32)
    lo = torch.empty_like(hi)
    bp, bc = _pow2(N, hi=PREPARE_PIXELS), _pow2(C, hi=PREPARE_CHANNELS)
    launch(_prepare_kernel, (cdiv(N, bp), cdiv(C, bc), B), dict(
        s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, hi_ptr=hi, lo_ptr=lo, N=N, C=C, W=W,
        **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"), ROWS=rows,
        TEACHER=teacher, BP=bp, BC=bc))
    return hi, lo


def delta_l1(job: dict) -> Tensor:
    """The per-tile partial sums of |Delta| (B, tiles, tiles) of an :func:`applies` job, and
    its sign bits where it has ``signs``: what ``_delta_kernel`` writes for it."""
    s, t, r_s, r_t, signs = job["a_s"], job["a_t"], job["r_as"], job["r_at"], job.get("signs")
    B, C, H, W = s.shape
    N = H * W
    hi, lo = prepare(s, t, r_s, r_t)
    tile = _pow2(N, hi=_tiles()[0])
    n = cdiv(N, tile)
    out = torch.empty((B, n, n), device=s.device, dtype=torch.float32)
    launch(_delta_prepared_kernel, (n, n, B), dict(
        hi_ptr=hi, lo_ptr=lo, rs_ptr=r_s, rt_ptr=r_t, out_ptr=out,
        sign_ptr=out if signs is None else signs, N=N, C=C, WORDS=cdiv(N, 32),
        WRITE_SIGNS=signs is not None, BITS=min(tile, 32), BI=tile, BJ=tile,
        BK=_pow2(2 * C, hi=BLOCK_K)))
    return out


def grad_l1(job: dict) -> tuple[Tensor, Tensor | None]:
    """dL/dX_S and dL/dX_T (None without ``teacher``) of a :func:`grad_applies` job, fp32
    (B, C, H, W): what ``_intra_tiled_grad_kernel`` writes for it."""
    s, t, r_s, r_t = job["s"], job["t"], job["r_s"], job["r_t"]
    teacher = job["teacher"]
    B, C, H, W = s.shape
    N = H * W
    hi, lo = prepare(s, t, r_s, r_t, rows=False, teacher=teacher)
    g_s = torch.empty((B, C, H, W), device=s.device, dtype=torch.float32)
    g_t = torch.empty_like(g_s) if teacher else None
    tile, _, max_bc = _tiles()
    bi, bc = _pow2(N, hi=tile), _pow2(C, hi=max_bc)  # bi: the forward's tile (sign bits)
    launch(_grad_prepared_kernel, (cdiv(N, bi), cdiv(C, bc), B),
           dict(hi_ptr=hi, lo_ptr=lo, rs_ptr=r_s, rt_ptr=r_t, gs_ptr=g_s,
                gt_ptr=g_s if g_t is None else g_t, g_ptr=job["grad_loss"], coef=job["coef"],
                sign_ptr=job["signs"], N=N, C=C, WORDS=cdiv(N, 32), TEACHER=teacher,
                BI=bi, BJ=bi, BC=bc),
           # Four operand tiles per step with the teacher's: three stages of them need 241
           # KB of shared memory at BC = 64, over sm_90's 227; two need 161.
           num_warps=8, num_stages=2 if teacher else 3)
    return g_s, g_t


#: Channel rows x pixels per program of inter-affinity's preparation (whole rows).
INTER_PREPARE_ELEMENTS = 4096


def inter_applies(distance: str, precision: str, pixels: int) -> bool:
    """Whether an inter-affinity pair takes :func:`inter_prepare` and
    :func:`inter_delta_l1`: l1 at "tf32x3", up to INTER_PREPARE_ELEMENTS pixels at the
    coarser level (a program holds whole rows)."""
    return distance == "l1" and precision == "tf32x3" and pixels <= INTER_PREPARE_ELEMENTS


def inter_prepare(q_s: Tensor, q_t: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r_qs, r_qt, hi, lo): the channels' inverse norms of level b (B, C_b), as
    ``inv_norms`` gives them up to the order of the sums, and the tf32 parts of
    [Q^_S - Q^_T; Q^_T] (B, 2 C_b, N_b), read by :func:`inter_delta_l1`. One launch reading
    the level once; memory: 4 B C_b N_b floats (134 MB at WRN50 level 2, B = 16)."""
    B, C, H, W = q_s.shape
    N = H * W
    if N > INTER_PREPARE_ELEMENTS:
        raise ValueError(f"inter_prepare: {N} pixels is over {INTER_PREPARE_ELEMENTS}")
    bn = _pow2(N)
    bc = max(INTER_PREPARE_ELEMENTS // bn, 1)
    hi = torch.empty((B, 2 * C, N), device=q_s.device, dtype=torch.float32)
    lo = torch.empty_like(hi)
    r_s = torch.empty((B, C), device=q_s.device, dtype=torch.float32)
    r_t = torch.empty_like(r_s)
    launch(_inter_prepare_kernel, (cdiv(C, bc), B), dict(
        qs_ptr=q_s, qt_ptr=q_t, rqs_ptr=r_s, rqt_ptr=r_t, hi_ptr=hi, lo_ptr=lo, C=C, N=N, W=W,
        **strides(q_s, "s_b s_c s_h s_w"), **strides(q_t, "t_b t_c t_h t_w"), EPS=eps,
        BC=bc, BN=bn), num_warps=8)
    return r_s, r_t, hi, lo


def inter_delta_l1(p_s: Tensor, p_t: Tensor, r_ps: Tensor, r_pt: Tensor, prepared: tuple,
                   unit_grad: Tensor | None = None) -> Tensor:
    """Per-tile sums of |Delta| (B, tiles_i, tiles_j) of an inter-affinity pair at tf32x3,
    from the pooled level (p_s, p_t (B, C_a, H_b, W_b) with their rows' inverse norms) and
    :func:`inter_prepare`'s ``prepared``; with ``unit_grad`` (fp32 (B, C_a, C_b)) also
    sign(Delta) there, as ``delta``'s ``unit_grad`` writes it for l1."""
    r_qs, r_qt, hi, lo = prepared
    B, Ra, H, W = p_s.shape
    K = H * W
    Rb = r_qs.shape[1]
    tile = _tiles()[0]
    bi, bj = _pow2(Ra, hi=tile), _pow2(Rb, hi=tile)
    n_i, n_j = cdiv(Ra, bi), cdiv(Rb, bj)
    out = torch.empty((B, n_i, n_j), device=p_s.device, dtype=torch.float32)
    launch(_inter_delta_prepared_kernel, (n_i, n_j, B), dict(
        ps_ptr=p_s, pt_ptr=p_t, rps_ptr=r_ps, rpt_ptr=r_pt, hi_ptr=hi, lo_ptr=lo,
        rqs_ptr=r_qs, rqt_ptr=r_qt, out_ptr=out,
        sign_ptr=out if unit_grad is None else unit_grad, Ra=Ra, Rb=Rb, K=K, W=W,
        WORDS=cdiv(Rb, 32), **strides(p_s, "ps_b ps_c ps_h ps_w"),
        **strides(p_t, "pt_b pt_c pt_h pt_w"), WRITE_SIGNS=0 if unit_grad is None else 2,
        BITS=min(bj, 32), BI=bi, BJ=bj, BK=_pow2(K, hi=BLOCK_K)))
    return out
