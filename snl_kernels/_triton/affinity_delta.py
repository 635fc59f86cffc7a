"""The Delta kernels of the affinity losses: Delta tiles (their loss partial sums, sign bits or
dL/dDelta), alone or up to four per launch, and the tiled backward of intra-affinity
(dL/dX from Delta tiles recomputed on chip, or from l1's sign bits). See ``affinity.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import affinity_prepared, cdiv, strides
from .affinity_tiles import (
    BLOCK_K,
    _delta_finish,
    _dot,
    _norms,
    _pow2,
    _sign_tile,
    _slot_names,
    _tile,
    _tiles,
    _zero_pairs,
)
from .launch import launch


@triton.jit
def _delta_tile(
    as_ptr, at_ptr, bs_ptr, bt_ptr, ras_ptr, rat_ptr, rbs_ptr, rbt_ptr, out_ptr, g_ptr, coef,
    sign_ptr, Ra, Rb, K, W, WORDS,
    as_b, as_c, as_h, as_w, at_b, at_c, at_h, at_w,
    bs_b, bs_c, bs_h, bs_w, bt_b, bt_c, bt_h, bt_w,
    pid_i, pid_j, b, n_i, n_j,
    A_PIX: tl.constexpr, B_PIX: tl.constexpr, L1: tl.constexpr, WRITE_GRAD: tl.constexpr,
    SYMMETRIC: tl.constexpr, WRITE_SIGNS: tl.constexpr, BITS: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Tile (pid_i, pid_j) of sample b of one Delta (n_i x n_j tiles per sample)."""
    ri = pid_i * BI + tl.arange(0, BI)
    rj = pid_j * BJ + tl.arange(0, BJ)
    # SYMMETRIC (a and b the same features, square tiles): tile (j, i) is tile (i, j)
    # transposed, so tiles below the diagonal skip their work and those above count twice.
    k_end = K
    if SYMMETRIC:
        k_end = tl.where(pid_j >= pid_i, K, 0)
    r_as, r_at = _norms(ras_ptr, rat_ptr, b, ri, Ra)
    r_bs, r_bt = _norms(rbs_ptr, rbt_ptr, b, rj, Rb)
    acc = tl.zeros([BI, BJ], dtype=tl.float32)
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        a_s = _tile(as_ptr + b * as_b, ri, ks, Ra, K, W, as_c, as_h, as_w, A_PIX) * r_as[:, None]
        a_t = _tile(at_ptr + b * at_b, ri, ks, Ra, K, W, at_c, at_h, at_w, A_PIX) * r_at[:, None]
        b_s = _tile(bs_ptr + b * bs_b, rj, ks, Rb, K, W, bs_c, bs_h, bs_w, B_PIX) * r_bs[:, None]
        b_t = _tile(bt_ptr + b * bt_b, rj, ks, Rb, K, W, bt_c, bt_h, bt_w, B_PIX) * r_bt[:, None]
        acc = _dot(a_s, tl.trans(b_s - b_t), acc, PRECISION)
        acc = _dot(a_s - a_t, tl.trans(b_t), acc, PRECISION)
    delta = -acc  # A_T B_T^T - A_S B_S^T; rows and columns past the ends are 0
    _delta_finish(delta, r_as, r_at, r_bs, r_bt, ri, rj, pid_i, pid_j, b, n_i, n_j, Ra, Rb,
                  WORDS, out_ptr, g_ptr, coef, sign_ptr, L1, WRITE_GRAD, SYMMETRIC,
                  WRITE_SIGNS, BITS, BI, BJ, PRECISION)


@triton.jit
def _delta_kernel(
    as_ptr, at_ptr, bs_ptr, bt_ptr, ras_ptr, rat_ptr, rbs_ptr, rbt_ptr, out_ptr, g_ptr, coef,
    sign_ptr, Ra, Rb, K, W, WORDS,
    as_b, as_c, as_h, as_w, at_b, at_c, at_h, at_w,
    bs_b, bs_c, bs_h, bs_w, bt_b, bt_c, bt_h, bt_w,
    A_PIX: tl.constexpr, B_PIX: tl.constexpr, L1: tl.constexpr, WRITE_GRAD: tl.constexpr,
    SYMMETRIC: tl.constexpr, WRITE_SIGNS: tl.constexpr, BITS: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    # One Delta: grid (tiles of rows, tiles of columns, samples).
    _delta_tile(as_ptr, at_ptr, bs_ptr, bt_ptr, ras_ptr, rat_ptr, rbs_ptr, rbt_ptr, out_ptr,
                g_ptr, coef, sign_ptr, Ra, Rb, K, W, WORDS,
                as_b, as_c, as_h, as_w, at_b, at_c, at_h, at_w,
                bs_b, bs_c, bs_h, bs_w, bt_b, bt_c, bt_h, bt_w,
                tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64),
                tl.num_programs(0), tl.num_programs(1),
                A_PIX, B_PIX, L1, WRITE_GRAD, SYMMETRIC, WRITE_SIGNS, BITS, BI, BJ, BK, PRECISION)


@triton.jit
def _delta_group_kernel(
    as0, at0, bs0, bt0, ras0, rat0, rbs0, rbt0, out0, g0, coef0, sign0, Ra0, Rb0, K0, W0, WORDS0,
    as_b0, as_c0, as_h0, as_w0, at_b0, at_c0, at_h0, at_w0, bs_b0, bs_c0, bs_h0, bs_w0, bt_b0,
    bt_c0, bt_h0, bt_w0, NI0, NJ0,
    as1, at1, bs1, bt1, ras1, rat1, rbs1, rbt1, out1, g1, coef1, sign1, Ra1, Rb1, K1, W1, WORDS1,
    as_b1, as_c1, as_h1, as_w1, at_b1, at_c1, at_h1, at_w1, bs_b1, bs_c1, bs_h1, bs_w1, bt_b1,
    bt_c1, bt_h1, bt_w1, NI1, NJ1,
    as2, at2, bs2, bt2, ras2, rat2, rbs2, rbt2, out2, g2, coef2, sign2, Ra2, Rb2, K2, W2, WORDS2,
    as_b2, as_c2, as_h2, as_w2, at_b2, at_c2, at_h2, at_w2, bs_b2, bs_c2, bs_h2, bs_w2, bt_b2,
    bt_c2, bt_h2, bt_w2, NI2, NJ2,
    as3, at3, bs3, bt3, ras3, rat3, rbs3, rbt3, out3, g3, coef3, sign3, Ra3, Rb3, K3, W3, WORDS3,
    as_b3, as_c3, as_h3, as_w3, at_b3, at_c3, at_h3, at_w3, bs_b3, bs_c3, bs_h3, bs_w3, bt_b3,
    bt_c3, bt_h3, bt_w3, NI3, NJ3,
    start1, start2, start3,
    A_PIX0: tl.constexpr, B_PIX0: tl.constexpr, L10: tl.constexpr, WRITE_GRAD0: tl.constexpr,
    SYMMETRIC0: tl.constexpr, WRITE_SIGNS0: tl.constexpr, BITS0: tl.constexpr, BI0: tl.constexpr,
    BJ0: tl.constexpr, BK0: tl.constexpr, PRECISION0: tl.constexpr,
    A_PIX1: tl.constexpr, B_PIX1: tl.constexpr, L11: tl.constexpr, WRITE_GRAD1: tl.constexpr,
    SYMMETRIC1: tl.constexpr, WRITE_SIGNS1: tl.constexpr, BITS1: tl.constexpr, BI1: tl.constexpr,
    BJ1: tl.constexpr, BK1: tl.constexpr, PRECISION1: tl.constexpr,
    A_PIX2: tl.constexpr, B_PIX2: tl.constexpr, L12: tl.constexpr, WRITE_GRAD2: tl.constexpr,
    SYMMETRIC2: tl.constexpr, WRITE_SIGNS2: tl.constexpr, BITS2: tl.constexpr, BI2: tl.constexpr,
    BJ2: tl.constexpr, BK2: tl.constexpr, PRECISION2: tl.constexpr,
    A_PIX3: tl.constexpr, B_PIX3: tl.constexpr, L13: tl.constexpr, WRITE_GRAD3: tl.constexpr,
    SYMMETRIC3: tl.constexpr, WRITE_SIGNS3: tl.constexpr, BITS3: tl.constexpr, BI3: tl.constexpr,
    BJ3: tl.constexpr, BK3: tl.constexpr, PRECISION3: tl.constexpr,
):
    # Up to four Deltas in one launch (intra-affinity levels, inter-affinity pairs, or their
    # gradients): grid axis 0 runs over the tiles of one Delta after another (NJ column tiles
    # per row of tiles), axis 1 over the samples; a branch per Delta.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _delta_tile(as0, at0, bs0, bt0, ras0, rat0, rbs0, rbt0, out0, g0, coef0, sign0, Ra0, Rb0,
        K0, W0, WORDS0, as_b0, as_c0, as_h0, as_w0, at_b0, at_c0, at_h0, at_w0, bs_b0, bs_c0, bs_h0,
        bs_w0, bt_b0, bt_c0, bt_h0, bt_w0, pid // NJ0, pid % NJ0, b, NI0, NJ0, A_PIX0, B_PIX0, L10,
        WRITE_GRAD0, SYMMETRIC0, WRITE_SIGNS0, BITS0, BI0, BJ0, BK0, PRECISION0)
    elif pid < start2:
        _delta_tile(as1, at1, bs1, bt1, ras1, rat1, rbs1, rbt1, out1, g1, coef1, sign1, Ra1, Rb1,
        K1, W1, WORDS1, as_b1, as_c1, as_h1, as_w1, at_b1, at_c1, at_h1, at_w1, bs_b1, bs_c1, bs_h1,
        bs_w1, bt_b1, bt_c1, bt_h1, bt_w1, (pid - start1) // NJ1, (pid - start1) % NJ1, b, NI1, NJ1,
        A_PIX1, B_PIX1, L11, WRITE_GRAD1, SYMMETRIC1, WRITE_SIGNS1, BITS1, BI1, BJ1, BK1,
        PRECISION1)
    elif pid < start3:
        _delta_tile(as2, at2, bs2, bt2, ras2, rat2, rbs2, rbt2, out2, g2, coef2, sign2, Ra2, Rb2,
        K2, W2, WORDS2, as_b2, as_c2, as_h2, as_w2, at_b2, at_c2, at_h2, at_w2, bs_b2, bs_c2, bs_h2,
        bs_w2, bt_b2, bt_c2, bt_h2, bt_w2, (pid - start2) // NJ2, (pid - start2) % NJ2, b, NI2, NJ2,
        A_PIX2, B_PIX2, L12, WRITE_GRAD2, SYMMETRIC2, WRITE_SIGNS2, BITS2, BI2, BJ2, BK2,
        PRECISION2)
    else:
        _delta_tile(as3, at3, bs3, bt3, ras3, rat3, rbs3, rbt3, out3, g3, coef3, sign3, Ra3, Rb3,
        K3, W3, WORDS3, as_b3, as_c3, as_h3, as_w3, at_b3, at_c3, at_h3, at_w3, bs_b3, bs_c3, bs_h3,
        bs_w3, bt_b3, bt_c3, bt_h3, bt_w3, (pid - start3) // NJ3, (pid - start3) % NJ3, b, NI3, NJ3,
        A_PIX3, B_PIX3, L13, WRITE_GRAD3, SYMMETRIC3, WRITE_SIGNS3, BITS3, BI3, BJ3, BK3,
        PRECISION3)


@triton.jit
def _intra_tiled_grad_tile(
    s_ptr, t_ptr, rs_ptr, rt_ptr, gs_ptr, gt_ptr, g_ptr, coef, sign_ptr,
    N, C, W, WORDS,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    pid_i, pid_c, b,
    L1: tl.constexpr, TEACHER: tl.constexpr, SIGNS: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Output tile (pixels pid_i, channels pid_c) of sample b of one level (see below)."""
    # Rows are pixels: X^T (N, C). dX_S^T[i, c] = -2 sum_j G[i, j] X_S^T[j, c] (G symmetric),
    # dX_T^T = +2 G X_T^T, with G = dL/dDelta from the Delta tile recomputed for every j,
    # or (SIGNS 1, l1) from the forward's sign bits, or (SIGNS 2, l2) from its Delta.
    # l1's G is +-1 or 0, exact in tf32: its split has nothing to add.
    G_PRECISION: tl.constexpr = "tf32x3-exact-a" if L1 and PRECISION == "tf32x3" else PRECISION
    ri = pid_i * BI + tl.arange(0, BI)
    cs = pid_c * BC + tl.arange(0, BC)
    s_base = s_ptr + b * s_b
    t_base = t_ptr + b * t_b
    r_si, r_ti = _norms(rs_ptr, rt_ptr, b, ri, N)
    acc_s = tl.zeros([BI, BC], dtype=tl.float32)
    acc_t = tl.zeros([BI, BC], dtype=tl.float32)
    for j0 in range(0, N, BJ):
        rj = j0 + tl.arange(0, BJ)
        r_sj, r_tj = _norms(rs_ptr, rt_ptr, b, rj, N)
        if SIGNS == 1:
            gd = _sign_tile(sign_ptr, ri, rj, b, N, WORDS, r_si, r_ti, r_sj, r_tj, BI)
        elif SIGNS == 2:  # l2: the forward's Delta (see _delta_finish), read as it was formed
            gd = tl.load(sign_ptr + (b * N + ri[:, None]) * N + rj[None, :],
                         mask=(ri < N)[:, None] & (rj < N)[None, :], other=0.0)
        else:
            d = tl.zeros([BI, BJ], dtype=tl.float32)
            for k0 in range(0, C, BK):
                ks = k0 + tl.arange(0, BK)
                xs_i = _tile(s_base, ri, ks, N, C, W, s_c, s_h, s_w, True) * r_si[:, None]
                xt_i = _tile(t_base, ri, ks, N, C, W, t_c, t_h, t_w, True) * r_ti[:, None]
                xs_j = _tile(s_base, rj, ks, N, C, W, s_c, s_h, s_w, True) * r_sj[:, None]
                xt_j = _tile(t_base, rj, ks, N, C, W, t_c, t_h, t_w, True) * r_tj[:, None]
                d = _dot(xs_i, tl.trans(xs_j - xt_j), d, PRECISION)
                d = _dot(xs_i - xt_i, tl.trans(xt_j), d, PRECISION)
            delta = -d
            if L1:
                delta = tl.where(_zero_pairs(r_si, r_ti, r_sj, r_tj), 0.0, delta)
                gd = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
            else:
                gd = delta
        xs_c = _tile(s_base, rj, cs, N, C, W, s_c, s_h, s_w, True) * r_sj[:, None]
        acc_s = _dot(gd, xs_c, acc_s, G_PRECISION)
        if TEACHER:
            xt_c = _tile(t_base, rj, cs, N, C, W, t_c, t_h, t_w, True) * r_tj[:, None]
            acc_t = _dot(gd, xt_c, acc_t, G_PRECISION)
    # coef: 2 * (2 / M) for l2, 2 * (1 / M) for l1; outputs are fp32 (B, C, N) buffers.
    scale = tl.load(g_ptr) * coef
    mask = (ri < N)[:, None] & (cs < C)[None, :]
    off = (b * C + cs[None, :]) * N + ri[:, None]
    tl.store(gs_ptr + off, -scale * acc_s, mask=mask)
    if TEACHER:
        tl.store(gt_ptr + off, scale * acc_t, mask=mask)


@triton.jit
def _intra_tiled_grad_kernel(
    s_ptr, t_ptr, rs_ptr, rt_ptr, gs_ptr, gt_ptr, g_ptr, coef, sign_ptr,
    N, C, W, WORDS,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    L1: tl.constexpr, TEACHER: tl.constexpr, SIGNS: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One level: grid (tiles of pixels, blocks of channels, samples).
    _intra_tiled_grad_tile(s_ptr, t_ptr, rs_ptr, rt_ptr, gs_ptr, gt_ptr, g_ptr, coef, sign_ptr,
                           N, C, W, WORDS, s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
                           tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64),
                           L1, TEACHER, SIGNS, BI, BJ, BK, BC, PRECISION)


@triton.jit
def _intra_tiled_grad_group_kernel(
    s0, t0, rs0, rt0, gs0, gt0, g0, coef0, sign0, N0, C0, W0, WORDS0, s_b0, s_c0, s_h0, s_w0, t_b0,
    t_c0, t_h0, t_w0, NC0,
    s1, t1, rs1, rt1, gs1, gt1, g1, coef1, sign1, N1, C1, W1, WORDS1, s_b1, s_c1, s_h1, s_w1, t_b1,
    t_c1, t_h1, t_w1, NC1,
    s2, t2, rs2, rt2, gs2, gt2, g2, coef2, sign2, N2, C2, W2, WORDS2, s_b2, s_c2, s_h2, s_w2, t_b2,
    t_c2, t_h2, t_w2, NC2,
    start1, start2,
    L10: tl.constexpr, TEACHER0: tl.constexpr, SIGNS0: tl.constexpr, BI0: tl.constexpr, BJ0:
    tl.constexpr, BK0: tl.constexpr, BC0: tl.constexpr, PRECISION0: tl.constexpr,
    L11: tl.constexpr, TEACHER1: tl.constexpr, SIGNS1: tl.constexpr, BI1: tl.constexpr, BJ1:
    tl.constexpr, BK1: tl.constexpr, BC1: tl.constexpr, PRECISION1: tl.constexpr,
    L12: tl.constexpr, TEACHER2: tl.constexpr, SIGNS2: tl.constexpr, BI2: tl.constexpr, BJ2:
    tl.constexpr, BK2: tl.constexpr, BC2: tl.constexpr, PRECISION2: tl.constexpr,
):
    # Up to three levels in one launch: grid axis 0 runs over the output tiles of one level
    # after another (NC channel blocks per pixel tile), axis 1 over the samples.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _intra_tiled_grad_tile(s0, t0, rs0, rt0, gs0, gt0, g0, coef0, sign0, N0, C0, W0, WORDS0,
        s_b0, s_c0, s_h0, s_w0, t_b0, t_c0, t_h0, t_w0, pid // NC0, pid % NC0, b, L10, TEACHER0,
        SIGNS0, BI0, BJ0, BK0, BC0, PRECISION0)
    elif pid < start2:
        _intra_tiled_grad_tile(s1, t1, rs1, rt1, gs1, gt1, g1, coef1, sign1, N1, C1, W1, WORDS1,
        s_b1, s_c1, s_h1, s_w1, t_b1, t_c1, t_h1, t_w1, (pid - start1) // NC1, (pid - start1) % NC1,
        b, L11, TEACHER1, SIGNS1, BI1, BJ1, BK1, BC1, PRECISION1)
    else:
        _intra_tiled_grad_tile(s2, t2, rs2, rt2, gs2, gt2, g2, coef2, sign2, N2, C2, W2, WORDS2,
        s_b2, s_c2, s_h2, s_w2, t_b2, t_c2, t_h2, t_w2, (pid - start2) // NC2, (pid - start2) % NC2,
        b, L12, TEACHER2, SIGNS2, BI2, BJ2, BK2, BC2, PRECISION2)


# --------------------------------------------------------------------------- launchers


def delta(a_s: Tensor, a_t: Tensor, b_s: Tensor, b_t: Tensor, r_as: Tensor, r_at: Tensor,
          r_bs: Tensor, r_bt: Tensor, pix_rows: bool, l1: bool, precision: str,
          grad: tuple[Tensor, float] | None = None, signs: Tensor | None = None,
          unit_grad: tuple[Tensor, float] | None = None,
          stored_delta: Tensor | None = None) -> Tensor:
    """Per-tile sums of Delta^2 or |Delta| (B, tiles_i, tiles_j), or dL/dDelta (B, Ra, Rb).

    With rows the pixels (intra-affinity) a and b are the same features; with rows the
    channels (inter-affinity) a is the pooled finer level and b the coarser level.
    ``grad = (grad_loss, coef)`` asks for ``grad_loss * coef * (Delta or sign(Delta))``.
    ``signs`` (int32 (B, Ra, ceil(Rb / 32)), intra-affinity l1): also store Delta > 0 as bits,
    for the tiles computed (the upper triangle of tiles when symmetric).
    ``unit_grad = (out, coef)`` (out float32 (B, Ra, Rb); a and b different features): with
    the partial sums, also write ``coef * Delta`` (l2, rounded as ``grad``'s) or
    ``sign(Delta)`` (l1: exact in tf32; its products take coef) into out. ``stored_delta`` (float32 (B, Ra, Rb), l2): with the partial sums, also write
    Delta there as formed (a symmetric Delta whole, from its upper tiles).
    """
    return delta_group([dict(a_s=a_s, a_t=a_t, b_s=b_s, b_t=b_t, r_as=r_as, r_at=r_at,
                             r_bs=r_bs, r_bt=r_bt, pix_rows=pix_rows, l1=l1,
                             precision=precision, grad=grad, signs=signs,
                             unit_grad=unit_grad, stored_delta=stored_delta)])[0]


DELTA_GROUP = 4  # Deltas per launch
# What the kernel's WRITE_SIGNS asks for (``_delta_finish``).
SIGN_BITS, UNIT_GRAD, DELTA = 1, 2, 3
_DELTA_ARGS = ("as_ptr", "at_ptr", "bs_ptr", "bt_ptr", "ras_ptr", "rat_ptr", "rbs_ptr",
               "rbt_ptr", "out_ptr", "g_ptr", "coef", "sign_ptr", "Ra", "Rb", "K", "W", "WORDS",
               "as_b", "as_c", "as_h", "as_w", "at_b", "at_c", "at_h", "at_w",
               "bs_b", "bs_c", "bs_h", "bs_w", "bt_b", "bt_c", "bt_h", "bt_w")
_DELTA_CONSTANTS = ("A_PIX", "B_PIX", "L1", "WRITE_GRAD", "SYMMETRIC", "WRITE_SIGNS", "BITS",
                    "BI", "BJ", "BK", "PRECISION")


def _delta_launch(a_s, a_t, b_s, b_t, r_as, r_at, r_bs, r_bt, pix_rows, l1, precision,
                  grad=None, signs=None, unit_grad=None,
                  stored_delta=None) -> tuple[dict, Tensor, tuple[int, int, int]]:
    """One Delta's kernel arguments (the single kernel's names), its output and grid."""
    B, Ca, Ha, Wa = a_s.shape
    _, Cb, _, _ = b_s.shape
    Ra, Rb, K = (Ha * Wa, Ha * Wa, Ca) if pix_rows else (Ca, Cb, Ha * Wa)
    tile = _tiles()[0]
    bi = _pow2(Ra, hi=tile)
    bj = _pow2(Rb, hi=tile)
    # Delta of one level's pixel affinities is symmetric: half the tiles of the loss suffice.
    symmetric = (grad is None and a_s is b_s and a_t is b_t and r_as is r_bs and r_at is r_bt
                 and bi == bj)
    bk = _pow2(K, hi=BLOCK_K)
    grid = (cdiv(Ra, bi), cdiv(Rb, bj), B)
    # Pointers the kernel does not touch (no gradient asked, no signs) are given ``out``.
    if grad is None:
        out = torch.empty(grid[2:] + grid[:2], device=a_s.device, dtype=torch.float32)
        g_loss, coef = out, 0.0
    else:
        out = torch.empty((B, Ra, Rb), device=a_s.device, dtype=torch.float32)
        g_loss, coef = grad
    extra, mode = (signs, SIGN_BITS) if signs is not None else (out, 0)
    if unit_grad is not None:
        if grad is not None or signs is not None or symmetric:
            raise ValueError("delta: unit_grad goes with the partial sums of a Delta of two "
                             "different feature sets, without grad or signs")
        extra, coef = unit_grad
        mode = UNIT_GRAD
    if stored_delta is not None:
        if grad is not None or signs is not None or unit_grad is not None or l1:
            raise ValueError("delta: stored_delta goes with the partial sums of an l2 Delta, "
                             "without grad, signs or unit_grad")
        extra, mode = stored_delta, DELTA
    args = dict(
        as_ptr=a_s, at_ptr=a_t, bs_ptr=b_s, bt_ptr=b_t,
        ras_ptr=r_as, rat_ptr=r_at, rbs_ptr=r_bs, rbt_ptr=r_bt,
        out_ptr=out, g_ptr=g_loss, coef=coef, sign_ptr=extra,
        Ra=Ra, Rb=Rb, K=K, W=Wa, WORDS=cdiv(Rb, 32),
        **strides(a_s, "as_b as_c as_h as_w"), **strides(a_t, "at_b at_c at_h at_w"),
        **strides(b_s, "bs_b bs_c bs_h bs_w"), **strides(b_t, "bt_b bt_c bt_h bt_w"),
        A_PIX=pix_rows, B_PIX=pix_rows, L1=l1, WRITE_GRAD=grad is not None,
        SYMMETRIC=symmetric, WRITE_SIGNS=mode, BITS=min(bj, 32),
        BI=bi, BJ=bj, BK=bk,
        PRECISION=precision,
    )
    return args, out, grid


_DELTA_SLOTS = _slot_names(_DELTA_ARGS + _DELTA_CONSTANTS, DELTA_GROUP)


def _split_off(jobs: list[dict], applies, alone, grouped) -> list:
    """``alone(job)`` for each job that ``applies`` to, ``grouped`` of the others (one call),
    the results in the jobs' order."""
    picked = [applies(job) for job in jobs]
    rest = iter(grouped([job for job, p in zip(jobs, picked, strict=True) if not p]))
    return [alone(job) if p else next(rest) for job, p in zip(jobs, picked, strict=True)]


def delta_group(jobs: list[dict]) -> list[Tensor]:
    """:func:`delta` of every job (its keyword arguments), up to four per launch; an
    intra-affinity l1 loss at "tf32x3" from prepared operands, in launches of its own
    (``affinity_prepared.py``)."""
    if any(map(affinity_prepared.applies, jobs)):
        return _split_off(jobs, affinity_prepared.applies, affinity_prepared.delta_l1,
                          delta_group)
    outs = []
    for first in range(0, len(jobs), DELTA_GROUP):
        picked = [_delta_launch(**job) for job in jobs[first:first + DELTA_GROUP]]
        if len(picked) == 1:
            args, out, grid = picked[0]
            launch(_delta_kernel, grid, args)
            outs.append(out)
            continue
        slots = picked + [picked[-1]] * (DELTA_GROUP - len(picked))
        kwargs, counts = {}, []
        for j, (args, _, grid) in enumerate(slots):
            counts.append(grid[0] * grid[1] if j < len(picked) else 0)
            kwargs.update({slot: args[n] for slot, n in _DELTA_SLOTS[j]})
            kwargs.update({f"NI{j}": grid[0], f"NJ{j}": grid[1]})
        starts = {f"start{i}": sum(counts[:i]) for i in range(1, DELTA_GROUP)}
        launch(_delta_group_kernel, (sum(counts), picked[0][2][2]), {**kwargs, **starts})
        outs += [out for _, out, _ in picked]
    return outs


def intra_tiled_grad(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, grad_loss: Tensor,
                     coef: float, l1: bool, teacher: bool, precision: str,
                     signs: Tensor | None = None,
                     delta: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """dL/dX_S and dL/dX_T (normalised features) as fp32 (B, C, H, W) buffers; for l1 from
    the forward's ``signs`` of Delta when given, for l2 from its ``delta`` (``delta``'s
    ``stored_delta``) when given, else from Delta tiles recomputed."""
    return intra_tiled_grad_group([dict(s=s, t=t, r_s=r_s, r_t=r_t, grad_loss=grad_loss,
                                        coef=coef, l1=l1, teacher=teacher,
                                        precision=precision, signs=signs, delta=delta)])[0]


TILED_GROUP = 3  # levels per launch of the tiled backward
_TILED_ARGS = ("s_ptr", "t_ptr", "rs_ptr", "rt_ptr", "gs_ptr", "gt_ptr", "g_ptr", "coef",
               "sign_ptr", "N", "C", "W", "WORDS", "s_b", "s_c", "s_h", "s_w", "t_b", "t_c",
               "t_h", "t_w")
_TILED_CONSTANTS = ("L1", "TEACHER", "SIGNS", "BI", "BJ", "BK", "BC", "PRECISION")


_TILED_SLOTS = _slot_names(_TILED_ARGS + _TILED_CONSTANTS, TILED_GROUP)


def _tiled_launch(s, t, r_s, r_t, grad_loss, coef, l1, teacher, precision, signs=None,
                  delta=None):
    """One level's kernel arguments (the single kernel's names), outputs and grid."""
    if delta is not None and (l1 or signs is not None):
        raise ValueError("intra_tiled_grad: delta is l2's, without signs")
    stored = signs if delta is None else delta
    B, C, H, W = s.shape
    N = H * W
    g_s = torch.empty((B, C, H, W), device=s.device, dtype=torch.float32)
    g_t = torch.empty_like(g_s) if teacher else None
    tile, max_bc, max_bc_signs = _tiles()
    bi = bj = _pow2(N, hi=tile)
    bc = _pow2(C, hi=max_bc if stored is None else max_bc_signs)
    args = dict(
        s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t,
        # Without the teacher's gradient or the signs, those pointers are unused: g_s.
        gs_ptr=g_s, gt_ptr=g_s if g_t is None else g_t, g_ptr=grad_loss, coef=coef,
        sign_ptr=g_s if stored is None else stored,
        N=N, C=C, W=W, WORDS=cdiv(N, 32),
        **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"),
        L1=l1, TEACHER=teacher, SIGNS=1 if signs is not None else 2 if delta is not None else 0,
        BI=bi, BJ=bj,
        BK=_pow2(C, hi=BLOCK_K), BC=bc, PRECISION=precision,
    )
    return args, (g_s, g_t), (cdiv(N, bi), cdiv(C, bc), B)


def intra_tiled_grad_group(jobs: list[dict]) -> list[tuple[Tensor, Tensor | None]]:
    """:func:`intra_tiled_grad` of every job (its keyword arguments), up to three per
    launch; l1 at "tf32x3" from sign bits from prepared operands, in launches of its own
    (``affinity_prepared.py``)."""
    if any(map(affinity_prepared.grad_applies, jobs)):
        return _split_off(jobs, affinity_prepared.grad_applies, affinity_prepared.grad_l1,
                          intra_tiled_grad_group)
    outs = []
    for first in range(0, len(jobs), TILED_GROUP):
        picked = [_tiled_launch(**job) for job in jobs[first:first + TILED_GROUP]]
        if len(picked) == 1:
            args, out, grid = picked[0]
            launch(_intra_tiled_grad_kernel, grid, args, num_warps=8)
            outs.append(out)
            continue
        slots = picked + [picked[-1]] * (TILED_GROUP - len(picked))
        kwargs, counts = {}, []
        for j, (args, _, grid) in enumerate(slots):
            counts.append(grid[0] * grid[1] if j < len(picked) else 0)
            kwargs.update({slot: args[n] for slot, n in _TILED_SLOTS[j]})
            kwargs[f"NC{j}"] = grid[1]
        starts = {f"start{i}": sum(counts[:i]) for i in range(1, TILED_GROUP)}
        launch(_intra_tiled_grad_group_kernel, (sum(counts), picked[0][2][2]),
               {**kwargs, **starts}, num_warps=8)
        outs += [out for _, out, _ in picked]
    return outs
