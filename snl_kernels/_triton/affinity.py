"""Triton kernels of the affinity losses; the math is in ``snl_kernels/intra_affinity_loss.py``
and ``snl_kernels/inter_affinity_loss.py``.

Every operand is seen as a (B, R, K) matrix per sample: rows R and a reduction axis K, one of
them the channels and the other the pixels of a (B, C, H, W) tensor read through its four
strides (``PIX_ROWS`` says which), so any layout is read in place. Row or column scales (the
inverse norms) are applied to tiles as they are loaded; the normalised features never exist
in memory.

Kernels:
- ``_inv_norm_kernel``: 1 / max(|row|, eps) for every row.
- ``_delta_kernel``: a tile of Delta = A_T B_T^T - A_S B_S^T formed from the stacked
  operands, ``-(A_S (B_S - B_T)^T + (A_S - A_T) B_T^T)``, so rounding scales with the
  difference; it writes the tile's sum of Delta^2 or |Delta| (a per-tile partial), or the
  tile of dL/dDelta (inter-affinity backward, where C_a x C_b is small).
- ``_intra_tiled_grad_kernel``: dL/dX = -+2 X G for a block of pixels and channels, G from
  the Delta tiles of the pixel pairs recomputed on chip (l2), or for l1 from the forward's
  sign bits of Delta (N^2 / 8 bytes per sample; no N x N float matrix in memory).
- ``_gram_loss_kernel`` / ``_gram_apply_kernel``: the C x C Gram form of intra-affinity l2:
  the loss from the upper triangle of tile pairs, which also writes the backward's Grams
  (formed once, by the forward when it runs with gradients), then their products with the
  features.
- ``_scaled_mm_kernel``: the inter-affinity backward products (dL/dDelta) Q^ and (.)^T P^.
- ``_norm_bwd_kernel``: back through x = f / max(|f|, eps), per row.
- ``_pool_kernel`` / ``_unpool_kernel``: adaptive average pooling and its gradient.

Per-tile partial sums are added by ``torch.sum`` over a fixed-size buffer: no atomics, the
same bits on every run. Products run at the precision the launchers are given (decided in
``snl_kernels/precision.py``): tf32 operands rounded to nearest, three tf32 products
("tf32x3", about fp32), or fp32 ("ieee"). The Delta form keeps rounding proportional to the
student-teacher difference, which is what makes tf32 accurate enough.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gpu_config, strides

BLOCK_ROWS = 32
BLOCK_K = 32
BLOCK_GRAM = 32  # Gram tiles: BLOCK_GRAM rows (BLOCK_GRAM_GPU on a GPU)
BLOCK_GRAM_GPU = 64  # 64 rows and up: tiles Hopper's wgmma takes
BLOCK_ELEMENTS = 512  # elements per program of pooling and its gradient


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(n))
    return min(p, hi) if hi else p


# --------------------------------------------------------------------------- loaders


@triton.jit
def _tile(ptr, rows, ks, R, K, W, s_c, s_h, s_w, PIX_ROWS: tl.constexpr):
    """fp32 (len(rows), len(ks)) tile; rows are pixels and ks channels, or the reverse."""
    if PIX_ROWS:
        off = ((rows // W) * s_h + (rows % W) * s_w)[:, None] + (ks * s_c)[None, :]
    else:
        off = (rows * s_c)[:, None] + ((ks // W) * s_h + (ks % W) * s_w)[None, :]
    mask = (rows < R)[:, None] & (ks < K)[None, :]
    return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _vec(ptr, idx, n):
    return tl.load(ptr + idx, mask=idx < n, other=0.0)


@triton.jit
def _norms(rs_ptr, rt_ptr, b, idx, n):
    """Student's and teacher's inverse norms of rows idx of sample b (n rows each; 0 past n)."""
    return _vec(rs_ptr + b * n, idx, n), _vec(rt_ptr + b * n, idx, n)


@triton.jit
def _zero_pairs(r_as, r_at, r_bs, r_bt):
    """Where Delta[i, j] is exactly 0 because of zero vectors (negative inverse norms).

    A_T[i, j] is 0 when row i or column j of the teacher is a zero vector, A_S[i, j] likewise;
    when both are, Delta is exactly 0 (the reference's sign(0) = 0). The difference form sums
    +-x_i . y_j pairs that cancel only up to the order of the hardware's sums, and a stray
    sign there moves an l1 gradient by the 1 / eps of a clamped norm.
    """
    teacher = (r_at < 0.0)[:, None] | (r_bt < 0.0)[None, :]
    student = (r_as < 0.0)[:, None] | (r_bs < 0.0)[None, :]
    return teacher & student


@triton.jit
def _out_tile(BM: tl.constexpr, BN: tl.constexpr):
    """Sample b (grid axis 2) and the rows (axis 0) and columns (axis 1) of this program's
    (BM, BN) output tile."""
    b = tl.program_id(2).to(tl.int64)
    return b, tl.program_id(0) * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)


@triton.jit
def _tf32(x):
    """x rounded to the nearest tf32 value (ties away from zero, as cvt.rna.tf32.f32)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b from fp32 tiles at PRECISION (``snl_kernels/precision.py``).

    "tf32": one tensor-core product of the operands rounded to nearest. Tensor cores read
    only the top 19 bits of an fp32 register, i.e. truncate, a biased error that rounding to
    nearest removes (both measured: BENCHMARKS.md, Accuracy). "tf32x3":
    each operand split into a rounded high part and a rounded remainder, three products
    (the low x low one is dropped), about fp32 accuracy. Both are written out here rather
    than left to ``input_precision`` so that the CPU interpreter (whose products are fp32
    whatever the precision) computes exactly what the tensor cores do.
    """
    if PRECISION == "ieee":
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "tf32":
        out = tl.dot(_tf32(a), _tf32(b), acc, input_precision="tf32")
    elif PRECISION == "tf32x3-exact-a":
        # tf32x3 where a holds tf32 values exactly (l1's +-1 and 0): its remainder is 0, so the
        # product it would enter is dropped; the same bits as "tf32x3", two products of three.
        b_hi = _tf32(b)
        out = tl.dot(a, _tf32(b - b_hi), acc, input_precision="tf32")
        out = tl.dot(a, b_hi, out, input_precision="tf32")
    else:
        a_hi = _tf32(a)
        b_hi = _tf32(b)
        out = tl.dot(_tf32(a - a_hi), b_hi, acc, input_precision="tf32")
        out = tl.dot(a_hi, _tf32(b - b_hi), out, input_precision="tf32")
        out = tl.dot(a_hi, b_hi, out, input_precision="tf32")
    return out


# --------------------------------------------------------------------------- kernels


@triton.jit
def _inv_norm_kernel(
    x_ptr, out_ptr, R, K, W, s_b, s_c, s_h, s_w,
    EPS: tl.constexpr, PIX_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A row that is exactly zero gets -1 / eps: x = f r is 0 all the same, and the sign marks
    # the zero vectors for _zero_pairs (consumers of r as a norm take |r|).
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    big = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _tile(x_ptr + b * s_b, rows, ks, R, K, W, s_c, s_h, s_w, PIX_ROWS)
        ss += tl.sum(x * x, axis=1)
        big = tl.maximum(big, tl.max(tl.abs(x), axis=1))
    r = 1.0 / tl.maximum(tl.sqrt(ss), EPS)
    tl.store(out_ptr + b * R + rows, tl.where(big == 0.0, -r, r), mask=rows < R)


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
    if L1:
        delta = tl.where(_zero_pairs(r_as, r_at, r_bs, r_bt), 0.0, delta)
    if WRITE_SIGNS:
        # Bit j % 32 of word (i, j // 32) says Delta[i, j] > 0, for the tiles computed (the
        # upper triangle of tiles); BITS = min(BJ, 32) columns per word of this tile.
        bits = (delta > 0).to(tl.int32) << (rj % 32)[None, :]
        words = tl.sum(tl.reshape(bits, [BI, BJ // BITS, BITS]), axis=2)
        cols = (pid_j * BJ) // 32 + tl.arange(0, BJ // BITS)
        keep = (ri < Ra)[:, None] & ((cols < WORDS) & (cols * 0 + pid_j >= pid_i))[None, :]
        tl.store(sign_ptr + (b * Ra + ri[:, None]) * WORDS + cols[None, :], words, mask=keep)
    if WRITE_GRAD:
        # dL/dDelta = g coef Delta (l2, coef = 2 / M) or g coef sign(Delta) (l1, coef = 1 / M).
        scale = tl.load(g_ptr) * coef
        if L1:
            grad = tl.where(delta > 0, scale, tl.where(delta < 0, -scale, 0.0))
        else:
            grad = delta * scale
        mask = (ri < Ra)[:, None] & (rj < Rb)[None, :]
        tl.store(out_ptr + (b * Ra + ri[:, None]) * Rb + rj[None, :], grad, mask=mask)
    else:
        if L1:
            part = tl.sum(tl.sum(tl.abs(delta), axis=1), axis=0)
        else:
            part = tl.sum(tl.sum(delta * delta, axis=1), axis=0)
        if SYMMETRIC:
            part = tl.where(pid_j > pid_i, 2.0 * part, part)
        tl.store(out_ptr + (b * n_i + pid_i) * n_j + pid_j, part)


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
    # dX_T^T = +2 G X_T^T, with G = dL/dDelta from the Delta tile recomputed for every j.
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
        if SIGNS:
            # l1 from the forward's sign bits: Delta is symmetric and only tiles (I, J) with
            # I <= J (in units of BI = the forward's tile) were stored.
            up = (ri // BI)[:, None] <= (rj // BI)[None, :]
            row = tl.where(up, ri[:, None], rj[None, :])
            col = tl.where(up, rj[None, :], ri[:, None])
            inside = (ri < N)[:, None] & (rj < N)[None, :]
            word = tl.load(sign_ptr + (b * N + row) * WORDS + col // 32, mask=inside, other=0)
            gd = tl.where(((word >> (col % 32)) & 1) != 0, 1.0, -1.0)
            gd = tl.where(inside & ~_zero_pairs(r_si, r_ti, r_sj, r_tj), gd, 0.0)
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


@triton.jit
def _store_pair(ptr, base, C, ci, cj, tile, mirror, mirrored):
    """Tile (I, J) of a (B, C, C) matrix, and if ``mirrored`` its tile (J, I), whose [j, i] is
    ``mirror[i, j]``: stored through transposed addresses, no transpose in registers."""
    mask = (ci < C)[:, None] & (cj < C)[None, :]
    tl.store(ptr + base + ci[:, None] * C + cj[None, :], tile, mask=mask)
    if mirrored:
        tl.store(ptr + base + cj[None, :] * C + ci[:, None], mirror, mask=mask)


@triton.jit
def _gram_loss_kernel(
    s_ptr, t_ptr, rs_ptr, rt_ptr, out_ptr, gss_ptr, gsd_ptr, gts_ptr, gtd_ptr,
    C, N, W, NT,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    STORE: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    # One tile pair (I, J), I <= J, of the C x C Grams of E = X_S + X_T and D = X_S - X_T
    # (rows: channels; the reduction runs over pixels scaled by their inverse norms). Since
    # X_S^T X_S - X_T^T X_T = (E^T D + D^T E) / 2, ||Delta||^2 = (<G_EE, G_DD> + <G_ED, G_DE>)
    # / 2. G_EE and G_DD are symmetric and G_ED(J, I) = G_DE(I, J)^T, so the tile (I, J)
    # with I < J also stands for (J, I): weight 1 there, 1/2 on the diagonal. Four products
    # per step, and no tile pair is formed twice.
    # STORE >= 1 also writes the backward's Grams G_SS = X_S X_S^T and G_SD = X_S D^T (and,
    # STORE = 2, G_TS = X_T X_S^T and G_TD = X_T D^T), tiles (I, J) and (J, I), from the same
    # four products: X_S = (E + D) / 2 and X_T = (E - D) / 2.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # The pid-th pair of the upper triangle, row by row: row r starts at r NT - r (r - 1) / 2.
    ti = pid * 0
    for r in range(1, NT):
        ti += (pid >= r * NT - r * (r - 1) // 2).to(tl.int32)
    tj = ti + pid - (ti * NT - ti * (ti - 1) // 2)
    ci = ti * BI + tl.arange(0, BI)
    cj = tj * BI + tl.arange(0, BI)
    s_base = s_ptr + b * s_b
    t_base = t_ptr + b * t_b
    g_ee = tl.zeros([BI, BI], dtype=tl.float32)
    g_dd = tl.zeros([BI, BI], dtype=tl.float32)
    g_ed = tl.zeros([BI, BI], dtype=tl.float32)
    g_de = tl.zeros([BI, BI], dtype=tl.float32)
    for k0 in range(0, N, BK):
        ks = k0 + tl.arange(0, BK)
        r_s, r_t = _norms(rs_ptr, rt_ptr, b, ks, N)
        xs_i = _tile(s_base, ci, ks, C, N, W, s_c, s_h, s_w, False) * r_s[None, :]
        xt_i = _tile(t_base, ci, ks, C, N, W, t_c, t_h, t_w, False) * r_t[None, :]
        xs_j = _tile(s_base, cj, ks, C, N, W, s_c, s_h, s_w, False) * r_s[None, :]
        xt_j = _tile(t_base, cj, ks, C, N, W, t_c, t_h, t_w, False) * r_t[None, :]
        e_i, d_i = xs_i + xt_i, xs_i - xt_i
        e_j, d_j = xs_j + xt_j, xs_j - xt_j
        g_ee = _dot(e_i, tl.trans(e_j), g_ee, PRECISION)
        g_dd = _dot(d_i, tl.trans(d_j), g_dd, PRECISION)
        g_ed = _dot(e_i, tl.trans(d_j), g_ed, PRECISION)
        g_de = _dot(d_i, tl.trans(e_j), g_de, PRECISION)
    weight = tl.where(ti == tj, 0.5, 1.0)
    part = weight * tl.sum(tl.sum(g_ee * g_dd + g_ed * g_de, axis=1), axis=0)
    tl.store(out_ptr + b * tl.num_programs(0) + pid, part)
    if STORE >= 1:
        # [i, j] of tile (I, J); [j, i] of tile (J, I) from G_ED[j, i] = g_de[i, j] and
        # G_DE[j, i] = g_ed[i, j] (the diagonal tile is written once, by itself).
        base = b * C * C
        mirror = ti != tj
        g_ss = (g_ee + g_ed + g_de + g_dd) * 0.25
        _store_pair(gss_ptr, base, C, ci, cj, g_ss, g_ss, mirror)
        _store_pair(gsd_ptr, base, C, ci, cj, (g_ed + g_dd) * 0.5, (g_de + g_dd) * 0.5, mirror)
        if STORE == 2:
            _store_pair(gts_ptr, base, C, ci, cj, (g_ee + g_ed - g_de - g_dd) * 0.25,
                        (g_ee + g_de - g_ed - g_dd) * 0.25, mirror)
            _store_pair(gtd_ptr, base, C, ci, cj, (g_ed - g_dd) * 0.5, (g_de - g_dd) * 0.5,
                        mirror)


@triton.jit
def _gram_apply_kernel(
    s_ptr, t_ptr, rs_ptr, rt_ptr, g1_ptr, g2_ptr, out_ptr, g_ptr, coef,
    C, N, W,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # out[c, n] = g coef (G1 D + G2 X_T)[c, n], D = X_S - X_T; fp32 (B, C, N) output.
    b, ci, ns = _out_tile(BI, BN)
    r_s, r_t = _norms(rs_ptr, rt_ptr, b, ns, N)
    acc = tl.zeros([BI, BN], dtype=tl.float32)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        gmask = (ci < C)[:, None] & (ks < C)[None, :]
        goff = (b * C + ci[:, None]) * C + ks[None, :]
        g1 = tl.load(g1_ptr + goff, mask=gmask, other=0.0)
        g2 = tl.load(g2_ptr + goff, mask=gmask, other=0.0)
        xs = _tile(s_ptr + b * s_b, ks, ns, C, N, W, s_c, s_h, s_w, False) * r_s[None, :]
        xt = _tile(t_ptr + b * t_b, ks, ns, C, N, W, t_c, t_h, t_w, False) * r_t[None, :]
        acc = _dot(g1, xs - xt, acc, PRECISION)
        acc = _dot(g2, xt, acc, PRECISION)
    mask = (ci < C)[:, None] & (ns < N)[None, :]
    tl.store(out_ptr + (b * C + ci[:, None]) * N + ns[None, :], tl.load(g_ptr) * coef * acc,
             mask=mask)


@triton.jit
def _scaled_mm_tile(
    g_ptr, y_ptr, ry_ptr, out_ptr, alpha, M, N, K, W,
    g_b, g_m, g_k, y_b, y_c, y_h, y_w, pid_m, pid_n, b,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output tile (pid_m, pid_n) of sample b of out = alpha G Y^ (see the kernel)."""
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        g = tl.load(g_ptr + b * g_b + rm[:, None] * g_m + ks[None, :] * g_k,
                    mask=(rm < M)[:, None] & (ks < K)[None, :], other=0.0)
        y = _tile(y_ptr + b * y_b, ks, rn, K, N, W, y_c, y_h, y_w, False)
        y = y * _vec(ry_ptr + b * K, ks, K)[:, None]
        acc = _dot(g, y, acc, PRECISION)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + (b * M + rm[:, None]) * N + rn[None, :], alpha * acc, mask=mask)


@triton.jit
def _scaled_mm_kernel(
    g_ptr, y_ptr, ry_ptr, out_ptr, alpha, M, N, K, W,
    g_b, g_m, g_k, y_b, y_c, y_h, y_w,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # out[b, m, n] = alpha sum_k G[b, m, k] Y^[b, k, n], Y^ = rows of Y (channels) scaled by
    # their inverse norms ry; G read through strides (a transpose is a stride swap).
    _scaled_mm_tile(g_ptr, y_ptr, ry_ptr, out_ptr, alpha, M, N, K, W, g_b, g_m, g_k,
                    y_b, y_c, y_h, y_w, tl.program_id(0), tl.program_id(1),
                    tl.program_id(2).to(tl.int64), BM, BN, BK, PRECISION)


@triton.jit
def _scaled_mm_group_kernel(
    g0, y0, ry0, o0, alpha0, M0, N0, K0, W0, NT0, g0_b, g0_m, g0_k, y0_b, y0_c, y0_h, y0_w,
    g1, y1, ry1, o1, alpha1, M1, N1, K1, W1, NT1, g1_b, g1_m, g1_k, y1_b, y1_c, y1_h, y1_w,
    g2, y2, ry2, o2, alpha2, M2, N2, K2, W2, NT2, g2_b, g2_m, g2_k, y2_b, y2_c, y2_h, y2_w,
    g3, y3, ry3, o3, alpha3, M3, N3, K3, W3, NT3, g3_b, g3_m, g3_k, y3_b, y3_c, y3_h, y3_w,
    start1, start2, start3,
    BM0: tl.constexpr, BN0: tl.constexpr, BK0: tl.constexpr, P0: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, P1: tl.constexpr, BM2: tl.constexpr, BN2: tl.constexpr, BK2: tl.constexpr, P2: tl.constexpr, BM3: tl.constexpr, BN3: tl.constexpr, BK3: tl.constexpr, P3: tl.constexpr,
):
    # Up to four products in one launch: grid axis 0 runs over the output tiles of one
    # product after another (NT column tiles per row of tiles), axis 1 over the samples.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _scaled_mm_tile(g0, y0, ry0, o0, alpha0, M0, N0, K0, W0,
                        g0_b, g0_m, g0_k, y0_b, y0_c, y0_h, y0_w,
                        pid // NT0, pid % NT0, b, BM0, BN0, BK0, P0)
    elif pid < start2:
        _scaled_mm_tile(g1, y1, ry1, o1, alpha1, M1, N1, K1, W1,
                        g1_b, g1_m, g1_k, y1_b, y1_c, y1_h, y1_w,
                        (pid - start1) // NT1, (pid - start1) % NT1, b, BM1, BN1, BK1, P1)
    elif pid < start3:
        _scaled_mm_tile(g2, y2, ry2, o2, alpha2, M2, N2, K2, W2,
                        g2_b, g2_m, g2_k, y2_b, y2_c, y2_h, y2_w,
                        (pid - start2) // NT2, (pid - start2) % NT2, b, BM2, BN2, BK2, P2)
    else:
        _scaled_mm_tile(g3, y3, ry3, o3, alpha3, M3, N3, K3, W3,
                        g3_b, g3_m, g3_k, y3_b, y3_c, y3_h, y3_w,
                        (pid - start3) // NT3, (pid - start3) % NT3, b, BM3, BN3, BK3, P3)


@triton.jit
def _norm_bwd_rows(
    f_ptr, r_ptr, gx_ptr, out_ptr, block, b, R, K, W,
    f_b, f_c, f_h, f_w, g_b, g_c, g_h, g_w,
    EPS: tl.constexpr, PIX_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows ``block`` of sample b: gradient for f from the gradient gx of x = f / max(|row|,
    eps); gx and out share the strides g_* (out may alias gx)."""
    # x = f r, r = 1 / max(|f|, eps): df = r (dx - x (x . dx)) when |f| > eps, else r dx.
    # Each program owns whole rows, so out may alias gx.
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    r = tl.abs(_vec(r_ptr + b * R, rows, R))  # negative: a zero row (see _inv_norm_kernel)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        f = _tile(f_ptr + b * f_b, rows, ks, R, K, W, f_c, f_h, f_w, PIX_ROWS)
        dx = _tile(gx_ptr + b * g_b, rows, ks, R, K, W, g_c, g_h, g_w, PIX_ROWS)
        ss += tl.sum(f * f, axis=1)
        dot += tl.sum(f * dx, axis=1)
    # x . dx = r (f . dx); the projection term drops where the norm was clamped.
    proj = tl.where(tl.sqrt(ss) > EPS, r * r * dot, 0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        f = _tile(f_ptr + b * f_b, rows, ks, R, K, W, f_c, f_h, f_w, PIX_ROWS)
        dx = _tile(gx_ptr + b * g_b, rows, ks, R, K, W, g_c, g_h, g_w, PIX_ROWS)
        df = r[:, None] * dx - proj[:, None] * r[:, None] * f
        if PIX_ROWS:
            off = ((rows // W) * g_h + (rows % W) * g_w)[:, None] + (ks * g_c)[None, :]
        else:
            off = (rows * g_c)[:, None] + ((ks // W) * g_h + (ks % W) * g_w)[None, :]
        mask = (rows < R)[:, None] & (ks < K)[None, :]
        tl.store(out_ptr + b * g_b + off, df.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    f_ptr, r_ptr, gx_ptr, out_ptr, R, K, W,
    f_b, f_c, f_h, f_w, g_b, g_c, g_h, g_w,
    EPS: tl.constexpr, PIX_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    _norm_bwd_rows(f_ptr, r_ptr, gx_ptr, out_ptr, tl.program_id(0),
                   tl.program_id(1).to(tl.int64), R, K, W, f_b, f_c, f_h, f_w, g_b, g_c, g_h,
                   g_w, EPS, PIX_ROWS, BLOCK_R, BLOCK_K)


@triton.jit
def _norm_bwd_group_kernel(
    f0, r0, gx0, o0, R0, K0, W0, f0_b, f0_c, f0_h, f0_w, g0_b, g0_c, g0_h, g0_w,
    f1, r1, gx1, o1, R1, K1, W1, f1_b, f1_c, f1_h, f1_w, g1_b, g1_c, g1_h, g1_w,
    f2, r2, gx2, o2, R2, K2, W2, f2_b, f2_c, f2_h, f2_w, g2_b, g2_c, g2_h, g2_w,
    f3, r3, gx3, o3, R3, K3, W3, f3_b, f3_c, f3_h, f3_w, g3_b, g3_c, g3_h, g3_w,
    f4, r4, gx4, o4, R4, K4, W4, f4_b, f4_c, f4_h, f4_w, g4_b, g4_c, g4_h, g4_w,
    f5, r5, gx5, o5, R5, K5, W5, f5_b, f5_c, f5_h, f5_w, g5_b, g5_c, g5_h, g5_w,
    f6, r6, gx6, o6, R6, K6, W6, f6_b, f6_c, f6_h, f6_w, g6_b, g6_c, g6_h, g6_w,
    f7, r7, gx7, o7, R7, K7, W7, f7_b, f7_c, f7_h, f7_w, g7_b, g7_c, g7_h, g7_w,
    start1, start2, start3, start4, start5, start6, start7,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PIX0: tl.constexpr, PIX1: tl.constexpr, PIX2: tl.constexpr, PIX3: tl.constexpr, PIX4: tl.constexpr, PIX5: tl.constexpr, PIX6: tl.constexpr, PIX7: tl.constexpr,
):
    # Up to eight norm backwards in one launch: grid axis 0 runs over the row blocks of one
    # slot after another, axis 1 over the samples; a branch per slot.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _norm_bwd_rows(f0, r0, gx0, o0, pid, b, R0, K0, W0,
                       f0_b, f0_c, f0_h, f0_w, g0_b, g0_c, g0_h, g0_w,
                       EPS, PIX0, BLOCK_R, BLOCK_K)
    elif pid < start2:
        _norm_bwd_rows(f1, r1, gx1, o1, pid - start1, b, R1, K1, W1,
                       f1_b, f1_c, f1_h, f1_w, g1_b, g1_c, g1_h, g1_w,
                       EPS, PIX1, BLOCK_R, BLOCK_K)
    elif pid < start3:
        _norm_bwd_rows(f2, r2, gx2, o2, pid - start2, b, R2, K2, W2,
                       f2_b, f2_c, f2_h, f2_w, g2_b, g2_c, g2_h, g2_w,
                       EPS, PIX2, BLOCK_R, BLOCK_K)
    elif pid < start4:
        _norm_bwd_rows(f3, r3, gx3, o3, pid - start3, b, R3, K3, W3,
                       f3_b, f3_c, f3_h, f3_w, g3_b, g3_c, g3_h, g3_w,
                       EPS, PIX3, BLOCK_R, BLOCK_K)
    elif pid < start5:
        _norm_bwd_rows(f4, r4, gx4, o4, pid - start4, b, R4, K4, W4,
                       f4_b, f4_c, f4_h, f4_w, g4_b, g4_c, g4_h, g4_w,
                       EPS, PIX4, BLOCK_R, BLOCK_K)
    elif pid < start6:
        _norm_bwd_rows(f5, r5, gx5, o5, pid - start5, b, R5, K5, W5,
                       f5_b, f5_c, f5_h, f5_w, g5_b, g5_c, g5_h, g5_w,
                       EPS, PIX5, BLOCK_R, BLOCK_K)
    elif pid < start7:
        _norm_bwd_rows(f6, r6, gx6, o6, pid - start6, b, R6, K6, W6,
                       f6_b, f6_c, f6_h, f6_w, g6_b, g6_c, g6_h, g6_w,
                       EPS, PIX6, BLOCK_R, BLOCK_K)
    else:
        _norm_bwd_rows(f7, r7, gx7, o7, pid - start7, b, R7, K7, W7,
                       f7_b, f7_c, f7_h, f7_w, g7_b, g7_c, g7_h, g7_w,
                       EPS, PIX7, BLOCK_R, BLOCK_K)


@triton.jit
def _bin(i, n_in, n_out):
    # Adaptive pooling bin of output i: [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)).
    return (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out


@triton.jit
def _pool_kernel(
    f_ptr, out_ptr, total, C, H_in, W_in, H_out, W_out,
    f_b, f_c, f_h, f_w,
    MAX_BH: tl.constexpr, MAX_BW: tl.constexpr, BLOCK: tl.constexpr,
):
    # One element of out (B, C, H_out, W_out) fp32 contiguous per lane.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    j = offs % W_out
    i = (offs // W_out) % H_out
    c = (offs // (W_out * H_out)) % C
    b = offs // (W_out * H_out * C)
    h0, h1 = _bin(i, H_in, H_out)
    w0, w1 = _bin(j, W_in, W_out)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = f_ptr + b * f_b + c * f_c
    for dh in range(0, MAX_BH):
        for dw in range(0, MAX_BW):
            h = h0 + dh
            w = w0 + dw
            m = mask & (h < h1) & (w < w1)
            acc += tl.load(base + h * f_h + w * f_w, mask=m, other=0.0).to(tl.float32)
    count = ((h1 - h0) * (w1 - w0)).to(tl.float32)
    tl.store(out_ptr + offs, acc / count, mask=mask)


@triton.jit
def _pool_rows(
    f_ptr, out_ptr, r_ptr, block, b, C, H_in, W_in, H_out, W_out, f_b, f_c, f_h, f_w,
    EPS: tl.constexpr, MAX_BH: tl.constexpr, MAX_BW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Channels ``block`` of sample b: their adaptive average pool (B, C, H_out, W_out) fp32
    and its rows' inverse norms (negative for a zero row, as ``_inv_norm_kernel``)."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < C
    K = H_out * W_out
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    big = tl.zeros([BLOCK_R], dtype=tl.float32)
    base = f_ptr + b * f_b + rows[:, None] * f_c
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        h0, h1 = _bin(ks // W_out, H_in, H_out)
        w0, w1 = _bin(ks % W_out, W_in, W_out)
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for dh in range(0, MAX_BH):
            for dw in range(0, MAX_BW):
                h = h0 + dh
                w = w0 + dw
                m = mask_r[:, None] & (mask_k & (h < h1) & (w < w1))[None, :]
                acc += tl.load(base + (h * f_h + w * f_w)[None, :], mask=m,
                               other=0.0).to(tl.float32)
        pooled = acc / ((h1 - h0) * (w1 - w0)).to(tl.float32)[None, :]
        mask = mask_r[:, None] & mask_k[None, :]
        pooled = tl.where(mask, pooled, 0.0)
        tl.store(out_ptr + (b * C + rows[:, None]) * K + ks[None, :], pooled, mask=mask)
        ss += tl.sum(pooled * pooled, axis=1)
        big = tl.maximum(big, tl.max(tl.abs(pooled), axis=1))
    r = 1.0 / tl.maximum(tl.sqrt(ss), EPS)
    tl.store(r_ptr + b * C + rows, tl.where(big == 0.0, -r, r), mask=mask_r)


@triton.jit
def _pool_norms_kernel(
    f0, o0, r0, C0, Hi0, Wi0, Ho0, Wo0, f0_b, f0_c, f0_h, f0_w,
    f1, o1, r1, C1, Hi1, Wi1, Ho1, Wo1, f1_b, f1_c, f1_h, f1_w,
    f2, o2, r2, C2, Hi2, Wi2, Ho2, Wo2, f2_b, f2_c, f2_h, f2_w,
    f3, o3, r3, C3, Hi3, Wi3, Ho3, Wo3, f3_b, f3_c, f3_h, f3_w,
    start1, start2, start3,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BH0: tl.constexpr, BW0: tl.constexpr, BH1: tl.constexpr, BW1: tl.constexpr,
    BH2: tl.constexpr, BW2: tl.constexpr, BH3: tl.constexpr, BW3: tl.constexpr,
):
    # Up to four tensors pooled in one launch (the teacher's and student's finer level of two
    # level pairs): grid axis 0 runs over the channel blocks of one tensor after another,
    # axis 1 over the samples; a branch per tensor.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _pool_rows(f0, o0, r0, pid, b, C0, Hi0, Wi0, Ho0, Wo0, f0_b, f0_c, f0_h, f0_w,
                   EPS, BH0, BW0, BLOCK_R, BLOCK_K)
    elif pid < start2:
        _pool_rows(f1, o1, r1, pid - start1, b, C1, Hi1, Wi1, Ho1, Wo1, f1_b, f1_c, f1_h, f1_w,
                   EPS, BH1, BW1, BLOCK_R, BLOCK_K)
    elif pid < start3:
        _pool_rows(f2, o2, r2, pid - start2, b, C2, Hi2, Wi2, Ho2, Wo2, f2_b, f2_c, f2_h, f2_w,
                   EPS, BH2, BW2, BLOCK_R, BLOCK_K)
    else:
        _pool_rows(f3, o3, r3, pid - start3, b, C3, Hi3, Wi3, Ho3, Wo3, f3_b, f3_c, f3_h, f3_w,
                   EPS, BH3, BW3, BLOCK_R, BLOCK_K)


@triton.jit
def _unpool_block(
    g_ptr, out_ptr, block, total, C, H_in, W_in, H_out, W_out,
    o_b, o_c, o_h, o_w,
    BLOCK: tl.constexpr,
):
    # out[b, c, h, w] = sum over the (at most 2 x 2) bins holding (h, w) of g / bin size;
    # g (B, C, H_out, W_out) fp32 contiguous, H_out <= H_in and W_out <= W_in.
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    w = offs % W_in
    h = (offs // W_in) % H_in
    bc = offs // (W_in * H_in)
    i_lo = (h * H_out) // H_in
    i_hi = ((h + 1) * H_out + H_in - 1) // H_in  # exclusive
    j_lo = (w * W_out) // W_in
    j_hi = ((w + 1) * W_out + W_in - 1) // W_in
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    g_base = g_ptr + bc * H_out * W_out
    for di in range(0, 2):
        for dj in range(0, 2):
            i = i_lo + di
            j = j_lo + dj
            m = mask & (i < i_hi) & (j < j_hi)
            h0, h1 = _bin(i, H_in, H_out)
            w0, w1 = _bin(j, W_in, W_out)
            count = ((h1 - h0) * (w1 - w0)).to(tl.float32)
            g = tl.load(g_base + i * W_out + j, mask=m, other=0.0)
            acc += tl.where(m, g / count, 0.0)
    out = out_ptr + (bc // C) * o_b + (bc % C) * o_c + h * o_h + w * o_w
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpool_kernel(
    g_ptr, out_ptr, total, C, H_in, W_in, H_out, W_out,
    o_b, o_c, o_h, o_w,
    BLOCK: tl.constexpr,
):
    _unpool_block(g_ptr, out_ptr, tl.program_id(0), total, C, H_in, W_in, H_out, W_out,
                  o_b, o_c, o_h, o_w, BLOCK)


@triton.jit
def _unpool_group_kernel(
    g0, o0, total0, C0, Hi0, Wi0, Ho0, Wo0, o0_b, o0_c, o0_h, o0_w,
    g1, o1, total1, C1, Hi1, Wi1, Ho1, Wo1, o1_b, o1_c, o1_h, o1_w,
    start1, BLOCK: tl.constexpr,
):
    # Two unpoolings in one launch: the blocks of the first, then those of the second.
    pid = tl.program_id(0)
    if pid < start1:
        _unpool_block(g0, o0, pid, total0, C0, Hi0, Wi0, Ho0, Wo0, o0_b, o0_c, o0_h, o0_w,
                      BLOCK)
    else:
        _unpool_block(g1, o1, pid - start1, total1, C1, Hi1, Wi1, Ho1, Wo1, o1_b, o1_c, o1_h,
                      o1_w, BLOCK)


# --------------------------------------------------------------------------- launchers

INTERPRETED = not isinstance(_delta_kernel, triton.runtime.JITFunction)
# Tile choices of the two configurations (``gpu_config``): the interpreter's (small, few
# numpy programs on test shapes) and the GPU's (``*_GPU``).
# Delta tiles, BLOCK_TILE x BLOCK_TILE: larger tiles re-read the operands fewer times on a
# GPU; small ones keep the CPU interpreter (numpy per program) quick on test shapes.
BLOCK_TILE, BLOCK_TILE_GPU = 32, 64
# Channels per program of the tiled backward: each block of channels recomputes the Delta
# tiles, so on a GPU as many as the registers allow; under the interpreter few, so that the
# tests' shapes split the channels too.
MAX_BLOCK_C, MAX_BLOCK_C_GPU = 32, 256
# l1's backward from sign bits recomputes nothing per channel block, and Triton's pipelining
# stages its 64-pixel x BC operand tiles in shared memory: at BC = 256 that needs 310-440 KB,
# over the 227 KB a block may have on an H200 (scripts/triton_compile_check.py reports it).
MAX_BLOCK_C_SIGNS, MAX_BLOCK_C_SIGNS_GPU = 32, 64


def _tiles() -> tuple[int, int, int]:
    """(Delta tile, channels per tiled-backward program, the same for l1 from sign bits) of
    the configuration in force (see ``gpu_config``)."""
    if gpu_config(INTERPRETED):
        return BLOCK_TILE_GPU, MAX_BLOCK_C_GPU, MAX_BLOCK_C_SIGNS_GPU
    return BLOCK_TILE, MAX_BLOCK_C, MAX_BLOCK_C_SIGNS


def inv_norms(x: Tensor, pix_rows: bool, eps: float) -> Tensor:
    """(B, R) float32 inverse norms of the rows (pixels or channels) of x (B, C, H, W)."""
    B, C, H, W = x.shape
    R, K = (H * W, C) if pix_rows else (C, H * W)
    out = torch.empty((B, R), device=x.device, dtype=torch.float32)
    _inv_norm_kernel[(triton.cdiv(R, BLOCK_ROWS), B)](
        x_ptr=x, out_ptr=out, R=R, K=K, W=W, **strides(x, "s_b s_c s_h s_w"),
        EPS=eps, PIX_ROWS=pix_rows, BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K,
    )
    return out


def delta(a_s: Tensor, a_t: Tensor, b_s: Tensor, b_t: Tensor, r_as: Tensor, r_at: Tensor,
          r_bs: Tensor, r_bt: Tensor, pix_rows: bool, l1: bool, precision: str,
          grad: tuple[Tensor, float] | None = None, signs: Tensor | None = None) -> Tensor:
    """Per-tile sums of Delta^2 or |Delta| (B, tiles_i, tiles_j), or dL/dDelta (B, Ra, Rb).

    With rows the pixels (intra-affinity) a and b are the same features; with rows the
    channels (inter-affinity) a is the pooled finer level and b the coarser level.
    ``grad = (grad_loss, coef)`` asks for ``grad_loss * coef * (Delta or sign(Delta))``.
    ``signs`` (int32 (B, Ra, ceil(Rb / 32)), intra-affinity l1): also store Delta > 0 as bits,
    for the tiles computed (the upper triangle of tiles when symmetric).
    """
    return delta_group([dict(a_s=a_s, a_t=a_t, b_s=b_s, b_t=b_t, r_as=r_as, r_at=r_at,
                             r_bs=r_bs, r_bt=r_bt, pix_rows=pix_rows, l1=l1,
                             precision=precision, grad=grad, signs=signs)])[0]


DELTA_GROUP = 4  # Deltas per launch
_DELTA_ARGS = ("as_ptr", "at_ptr", "bs_ptr", "bt_ptr", "ras_ptr", "rat_ptr", "rbs_ptr",
               "rbt_ptr", "out_ptr", "g_ptr", "coef", "sign_ptr", "Ra", "Rb", "K", "W", "WORDS",
               "as_b", "as_c", "as_h", "as_w", "at_b", "at_c", "at_h", "at_w",
               "bs_b", "bs_c", "bs_h", "bs_w", "bt_b", "bt_c", "bt_h", "bt_w")
_DELTA_CONSTANTS = ("A_PIX", "B_PIX", "L1", "WRITE_GRAD", "SYMMETRIC", "WRITE_SIGNS", "BITS",
                    "BI", "BJ", "BK", "PRECISION")


def _delta_launch(a_s, a_t, b_s, b_t, r_as, r_at, r_bs, r_bt, pix_rows, l1, precision,
                  grad=None, signs=None) -> tuple[dict, Tensor, tuple[int, int, int]]:
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
    grid = (triton.cdiv(Ra, bi), triton.cdiv(Rb, bj), B)
    # Pointers the kernel does not touch (no gradient asked, no signs) are given ``out``.
    if grad is None:
        out = torch.empty(grid[2:] + grid[:2], device=a_s.device, dtype=torch.float32)
        g_loss, coef = out, 0.0
    else:
        out = torch.empty((B, Ra, Rb), device=a_s.device, dtype=torch.float32)
        g_loss, coef = grad
    args = dict(
        as_ptr=a_s, at_ptr=a_t, bs_ptr=b_s, bt_ptr=b_t,
        ras_ptr=r_as, rat_ptr=r_at, rbs_ptr=r_bs, rbt_ptr=r_bt,
        out_ptr=out, g_ptr=g_loss, coef=coef, sign_ptr=out if signs is None else signs,
        Ra=Ra, Rb=Rb, K=K, W=Wa, WORDS=triton.cdiv(Rb, 32),
        **strides(a_s, "as_b as_c as_h as_w"), **strides(a_t, "at_b at_c at_h at_w"),
        **strides(b_s, "bs_b bs_c bs_h bs_w"), **strides(b_t, "bt_b bt_c bt_h bt_w"),
        A_PIX=pix_rows, B_PIX=pix_rows, L1=l1, WRITE_GRAD=grad is not None,
        SYMMETRIC=symmetric, WRITE_SIGNS=signs is not None, BITS=min(bj, 32),
        BI=bi, BJ=bj, BK=bk,
        PRECISION=precision,
    )
    return args, out, grid


def _slot_name(name: str, j: int) -> str:
    return f"{name[:-4]}{j}" if name.endswith("_ptr") else f"{name}{j}"


def delta_group(jobs: list[dict]) -> list[Tensor]:
    """:func:`delta` of every job (its keyword arguments), up to four per launch."""
    outs = []
    for first in range(0, len(jobs), DELTA_GROUP):
        picked = [_delta_launch(**job) for job in jobs[first:first + DELTA_GROUP]]
        if len(picked) == 1:
            args, out, grid = picked[0]
            _delta_kernel[grid](**args)
            outs.append(out)
            continue
        slots = picked + [picked[-1]] * (DELTA_GROUP - len(picked))
        kwargs, counts = {}, []
        for j, (args, _, grid) in enumerate(slots):
            counts.append(grid[0] * grid[1] if j < len(picked) else 0)
            kwargs.update({_slot_name(n, j): args[n] for n in _DELTA_ARGS + _DELTA_CONSTANTS})
            kwargs.update({f"NI{j}": grid[0], f"NJ{j}": grid[1]})
        starts = {f"start{i}": sum(counts[:i]) for i in range(1, DELTA_GROUP)}
        _delta_group_kernel[(sum(counts), picked[0][2][2])](**kwargs, **starts)
        outs += [out for _, out, _ in picked]
    return outs


def intra_tiled_grad(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, grad_loss: Tensor,
                     coef: float, l1: bool, teacher: bool, precision: str,
                     signs: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """dL/dX_S and dL/dX_T (normalised features) as fp32 (B, C, H, W) buffers; for l1 from
    the forward's ``signs`` of Delta when given, else from Delta tiles recomputed."""
    return intra_tiled_grad_group([dict(s=s, t=t, r_s=r_s, r_t=r_t, grad_loss=grad_loss,
                                        coef=coef, l1=l1, teacher=teacher,
                                        precision=precision, signs=signs)])[0]


TILED_GROUP = 3  # levels per launch of the tiled backward
_TILED_ARGS = ("s_ptr", "t_ptr", "rs_ptr", "rt_ptr", "gs_ptr", "gt_ptr", "g_ptr", "coef",
               "sign_ptr", "N", "C", "W", "WORDS", "s_b", "s_c", "s_h", "s_w", "t_b", "t_c",
               "t_h", "t_w")
_TILED_CONSTANTS = ("L1", "TEACHER", "SIGNS", "BI", "BJ", "BK", "BC", "PRECISION")


def _tiled_launch(s, t, r_s, r_t, grad_loss, coef, l1, teacher, precision, signs=None):
    """One level's kernel arguments (the single kernel's names), outputs and grid."""
    B, C, H, W = s.shape
    N = H * W
    g_s = torch.empty((B, C, H, W), device=s.device, dtype=torch.float32)
    g_t = torch.empty_like(g_s) if teacher else None
    tile, max_bc, max_bc_signs = _tiles()
    bi = bj = _pow2(N, hi=tile)
    bc = _pow2(C, hi=max_bc if signs is None else max_bc_signs)
    args = dict(
        s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t,
        # Without the teacher's gradient or the signs, those pointers are unused: g_s.
        gs_ptr=g_s, gt_ptr=g_s if g_t is None else g_t, g_ptr=grad_loss, coef=coef,
        sign_ptr=g_s if signs is None else signs,
        N=N, C=C, W=W, WORDS=triton.cdiv(N, 32),
        **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"),
        L1=l1, TEACHER=teacher, SIGNS=signs is not None, BI=bi, BJ=bj,
        BK=_pow2(C, hi=BLOCK_K), BC=bc, PRECISION=precision,
    )
    return args, (g_s, g_t), (triton.cdiv(N, bi), triton.cdiv(C, bc), B)


def intra_tiled_grad_group(jobs: list[dict]) -> list[tuple[Tensor, Tensor | None]]:
    """:func:`intra_tiled_grad` of every job (its keyword arguments), up to three per
    launch."""
    outs = []
    for first in range(0, len(jobs), TILED_GROUP):
        picked = [_tiled_launch(**job) for job in jobs[first:first + TILED_GROUP]]
        if len(picked) == 1:
            args, out, grid = picked[0]
            _intra_tiled_grad_kernel[grid](**args, num_warps=8)
            outs.append(out)
            continue
        slots = picked + [picked[-1]] * (TILED_GROUP - len(picked))
        kwargs, counts = {}, []
        for j, (args, _, grid) in enumerate(slots):
            counts.append(grid[0] * grid[1] if j < len(picked) else 0)
            kwargs.update({_slot_name(n, j): args[n] for n in _TILED_ARGS + _TILED_CONSTANTS})
            kwargs[f"NC{j}"] = grid[1]
        starts = {f"start{i}": sum(counts[:i]) for i in range(1, TILED_GROUP)}
        _intra_tiled_grad_group_kernel[(sum(counts), picked[0][2][2])](**kwargs, **starts,
                                                                        num_warps=8)
        outs += [out for _, out, _ in picked]
    return outs


def gram_loss_block(C: int) -> int:
    """Rows of a Gram tile, of the loss and of the gradient's products (the configuration in
    force, ``gpu_config``)."""
    return _pow2(C, hi=BLOCK_GRAM_GPU if gpu_config(INTERPRETED) else BLOCK_GRAM)


def gram_loss(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, precision: str,
              store: int = 0) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Per-tile-pair sums of ||Delta||^2 (B, tile pairs of the upper triangle), from the
    Grams of E = X_S + X_T and D = X_S - X_T (``_gram_loss_kernel``); with ``store`` 1 also
    the backward's (B, C, C) float32 Grams (G_SS, G_SD), with 2 (G_SS, G_SD, G_TS, G_TD)."""
    B, C, H, W = s.shape
    bi = gram_loss_block(C)
    nt = triton.cdiv(C, bi)
    pairs = nt * (nt + 1) // 2
    out = torch.empty((B, pairs), device=s.device, dtype=torch.float32)
    grams = tuple(torch.empty((B, C, C), device=s.device, dtype=torch.float32)
                  for _ in range(2 * store))
    # Pointers of Grams not stored are given ``out``: the kernel does not touch them.
    g = grams + (out,) * (4 - len(grams))
    _gram_loss_kernel[(pairs, B)](
        s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, out_ptr=out,
        gss_ptr=g[0], gsd_ptr=g[1], gts_ptr=g[2], gtd_ptr=g[3],
        C=C, N=H * W, W=W, NT=nt,
        **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"),
        STORE=store, BI=bi, BK=_pow2(H * W, hi=BLOCK_K), PRECISION=precision,
        num_warps=8 if bi >= 64 else 4,
    )
    return out, grams or None


def gram_grad(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, grad_loss: Tensor, coef: float,
              teacher: bool, precision: str,
              grams: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor | None]:
    """coef g (G_SS D + G_SD X_T) and -coef g (G_TS D + G_TD X_T), fp32 (B, C, H, W).

    ``grams``: the Grams the forward stored (:func:`gram_loss` with ``store``, 2 for the
    teacher's gradient); None forms them again with the loss kernel."""
    B, C, H, W = s.shape
    N = H * W
    if grams is None:
        grams = gram_loss(s, t, r_s, r_t, precision, store=2 if teacher else 1)[1]
    bi = gram_loss_block(C)
    bn = _pow2(N, hi=_tiles()[0])
    grid = (triton.cdiv(C, bi), triton.cdiv(N, bn), B)
    outs = []
    for g1, g2, sign in ((grams[0], grams[1], 1.0), (*grams[2:4], -1.0))[: 2 if teacher else 1]:
        out = torch.empty((B, C, H, W), device=s.device, dtype=torch.float32)
        _gram_apply_kernel[grid](
            s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, g1_ptr=g1, g2_ptr=g2, out_ptr=out,
            g_ptr=grad_loss, coef=sign * coef, C=C, N=N, W=W,
            **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"), BI=bi, BN=bn,
            BK=_pow2(C, hi=BLOCK_K), PRECISION=precision,
        )
        outs.append(out)
    return outs[0], outs[1] if teacher else None


def scaled_mm(g: Tensor, y: Tensor, r_y: Tensor, alpha: float, precision: str) -> Tensor:
    """alpha g @ (y's channel rows scaled by r_y): g (B, M, C_y), y (B, C_y, h, w) ->
    float32 (B, M, h, w); products at ``precision`` (``snl_kernels/precision.py``)."""
    return scaled_mm_group([(g, y, r_y, alpha, precision)])[0]


MM_GROUP = 4  # products per launch


def _mm_plan(g: Tensor, y: Tensor) -> dict:
    B, M, K = g.shape
    _, _, H, W = y.shape
    N = H * W
    tile = _tiles()[0]
    bm, bn = _pow2(M, hi=tile), _pow2(N, hi=tile)
    return {"M": M, "N": N, "K": K, "W": W, "H": H, "B": B, "BM": bm, "BN": bn,
            "BK": _pow2(K, hi=BLOCK_K), "tiles_m": triton.cdiv(M, bm),
            "tiles_n": triton.cdiv(N, bn)}


def scaled_mm_group(jobs: list[tuple]) -> list[Tensor]:
    """:func:`scaled_mm` of every ``(g, y, r_y, alpha, precision)``, up to four per launch."""
    outs = []
    for first in range(0, len(jobs), MM_GROUP):
        picked = list(range(first, min(first + MM_GROUP, len(jobs))))
        plans = {k: _mm_plan(jobs[k][0], jobs[k][1]) for k in picked}
        results = {k: torch.empty((p["B"], p["M"], p["H"], p["W"]), device=jobs[k][0].device,
                                  dtype=torch.float32) for k, p in plans.items()}
        if len(picked) == 1:
            k = picked[0]
            g, y, r_y, alpha, precision = jobs[k]
            p = plans[k]
            _scaled_mm_kernel[(p["tiles_m"], p["tiles_n"], p["B"])](
                g_ptr=g, y_ptr=y, ry_ptr=r_y, out_ptr=results[k], alpha=alpha, M=p["M"],
                N=p["N"], K=p["K"], W=p["W"], **strides(g, "g_b g_m g_k"),
                **strides(y, "y_b y_c y_h y_w"), BM=p["BM"], BN=p["BN"], BK=p["BK"],
                PRECISION=precision,
            )
            outs.append(results[k])
            continue
        slots = picked + [picked[-1]] * (MM_GROUP - len(picked))
        args, counts = {}, []
        for j, k in enumerate(slots):
            g, y, r_y, alpha, precision = jobs[k]
            p = plans[k]
            counts.append(p["tiles_m"] * p["tiles_n"] if j < len(picked) else 0)
            args.update({f"g{j}": g, f"y{j}": y, f"ry{j}": r_y, f"o{j}": results[k],
                         f"alpha{j}": alpha, f"M{j}": p["M"], f"N{j}": p["N"], f"K{j}": p["K"],
                         f"W{j}": p["W"], f"NT{j}": p["tiles_n"],
                         **strides(g, f"g{j}_b g{j}_m g{j}_k"),
                         **strides(y, f"y{j}_b y{j}_c y{j}_h y{j}_w"),
                         f"BM{j}": p["BM"], f"BN{j}": p["BN"], f"BK{j}": p["BK"],
                         f"P{j}": precision})
        starts = {f"start{i}": sum(counts[:i]) for i in range(1, MM_GROUP)}
        _scaled_mm_group_kernel[(sum(counts), plans[picked[0]]["B"])](**args, **starts)
        outs += [results[k] for k in picked]
    return outs


def norm_backward(f: Tensor, r: Tensor, gx: Tensor, pix_rows: bool, eps: float,
                  out: Tensor | None = None) -> Tensor:
    """Gradient for f from the gradient gx of x = f / max(|row|, eps); in place when out is
    None (gx must then be float32 and is overwritten); out has gx's strides."""
    return norm_backward_group([(f, r, gx, pix_rows, out)], eps)[0]


NORM_GROUP = 8  # norm backwards per launch


def norm_backward_group(jobs: list[tuple], eps: float) -> list[Tensor]:
    """:func:`norm_backward` of every ``(f, r, gx, pix_rows, out)``, up to eight per launch
    (one launch, a branch per job)."""
    outs = []
    for first in range(0, len(jobs), NORM_GROUP):
        picked = list(range(first, min(first + NORM_GROUP, len(jobs))))
        slots = picked + [picked[-1]] * (NORM_GROUP - len(picked))
        args, counts, results = {}, [], {}
        B = jobs[picked[0]][0].shape[0]
        for j, k in enumerate(slots):
            f, r, gx, pix_rows, out = jobs[k]
            if k not in results:
                results[k] = gx if out is None else out
                if results[k].stride() != gx.stride():
                    raise ValueError("norm_backward: out must have gx's strides")
            _, C, H, W = f.shape
            R, K = (H * W, C) if pix_rows else (C, H * W)
            counts.append(triton.cdiv(R, BLOCK_ROWS) if j < len(picked) else 0)
            args.update({f"f{j}": f, f"r{j}": r, f"gx{j}": gx, f"o{j}": results[k],
                         f"R{j}": R, f"K{j}": K, f"W{j}": W, f"PIX{j}": pix_rows,
                         **strides(f, f"f{j}_b f{j}_c f{j}_h f{j}_w"),
                         **strides(gx, f"g{j}_b g{j}_c g{j}_h g{j}_w")})
        starts = {f"start{i}": sum(counts[:i]) for i in range(1, NORM_GROUP)}
        if len(picked) == 1:
            k = picked[0]
            f, r, gx, pix_rows, _ = jobs[k]
            _norm_bwd_kernel[(counts[0], B)](
                f_ptr=f, r_ptr=r, gx_ptr=gx, out_ptr=results[k], R=args["R0"], K=args["K0"],
                W=args["W0"], **strides(f, "f_b f_c f_h f_w"),
                **strides(gx, "g_b g_c g_h g_w"), EPS=eps, PIX_ROWS=pix_rows,
                BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K,
            )
        else:
            _norm_bwd_group_kernel[(sum(counts), B)](
                **args, **starts, EPS=eps, BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K,
            )
        outs += [results[k] for k in picked]
    return outs


def _max_bin(n_in: int, n_out: int) -> int:
    return max(-(-(i + 1) * n_in // n_out) - (i * n_in) // n_out for i in range(n_out))


def pool(f: Tensor, size: tuple[int, int]) -> Tensor:
    """adaptive_avg_pool2d(f, size) as a float32 contiguous (B, C, h, w) tensor."""
    B, C, H, W = f.shape
    h, w = size
    out = torch.empty((B, C, h, w), device=f.device, dtype=torch.float32)
    _pool_kernel[(triton.cdiv(out.numel(), BLOCK_ELEMENTS),)](
        f_ptr=f, out_ptr=out, total=out.numel(), C=C, H_in=H, W_in=W, H_out=h, W_out=w,
        **strides(f, "f_b f_c f_h f_w"),
        MAX_BH=_max_bin(H, h), MAX_BW=_max_bin(W, w), BLOCK=BLOCK_ELEMENTS,
    )
    return out


POOL_GROUP = 4  # tensors per pooling launch


def pool_with_norms(tensors: list[Tensor], sizes: list[tuple[int, int]],
                    eps: float) -> list[tuple[Tensor, Tensor]]:
    """``(adaptive_avg_pool2d(f, size), inverse norms of its channel rows)`` of every
    tensor, up to four per launch; the same values as :func:`pool` then :func:`inv_norms`
    (channel rows)."""
    B = tensors[0].shape[0]
    results = []
    for first in range(0, len(tensors), POOL_GROUP):
        picked = list(range(first, min(first + POOL_GROUP, len(tensors))))
        slots = picked + [picked[-1]] * (POOL_GROUP - len(picked))
        args, counts, outs = {}, [], {}
        for j, k in enumerate(slots):
            f = tensors[k]
            _, C, H, W = f.shape
            h, w = sizes[k]
            if k not in outs:
                outs[k] = (torch.empty((B, C, h, w), device=f.device, dtype=torch.float32),
                           torch.empty((B, C), device=f.device, dtype=torch.float32))
            pooled, r = outs[k]
            counts.append(triton.cdiv(C, BLOCK_ROWS) if j < len(picked) else 0)
            args.update({f"f{j}": f, f"o{j}": pooled, f"r{j}": r, f"C{j}": C, f"Hi{j}": H,
                         f"Wi{j}": W, f"Ho{j}": h, f"Wo{j}": w,
                         **strides(f, f"f{j}_b f{j}_c f{j}_h f{j}_w"),
                         f"BH{j}": _max_bin(H, h), f"BW{j}": _max_bin(W, w)})
        starts = [sum(counts[:i]) for i in range(1, POOL_GROUP)]
        _pool_norms_kernel[(sum(counts), B)](
            **args, start1=starts[0], start2=starts[1], start3=starts[2],
            EPS=eps, BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K,
        )
        results += [outs[k] for k in picked]
    return results


def unpool(g: Tensor, like: Tensor) -> Tensor:
    """Gradient of adaptive_avg_pool2d for input ``like`` from g (B, C, h, w) float32."""
    return unpool_group([(g, like)])[0]


def unpool_group(jobs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """:func:`unpool` of every ``(g, like)``, two per launch."""
    outs = []
    for first in range(0, len(jobs), 2):
        picked = jobs[first:first + 2]
        results, args, counts = [], {}, []
        for j, (g, like) in enumerate(picked):
            B, C, H, W = like.shape
            h, w = g.shape[2:]
            out = torch.empty((B, C, H, W), device=g.device, dtype=like.dtype)
            results.append(out)
            counts.append(triton.cdiv(out.numel(), BLOCK_ELEMENTS))
            args.update({f"g{j}": g, f"o{j}": out, f"total{j}": out.numel(), f"C{j}": C,
                         f"Hi{j}": H, f"Wi{j}": W, f"Ho{j}": h, f"Wo{j}": w,
                         **strides(out, f"o{j}_b o{j}_c o{j}_h o{j}_w")})
        if len(picked) == 1:
            _unpool_kernel[(counts[0],)](
                g_ptr=args["g0"], out_ptr=results[0], total=args["total0"], C=args["C0"],
                H_in=args["Hi0"], W_in=args["Wi0"], H_out=args["Ho0"], W_out=args["Wo0"],
                **strides(results[0], "o_b o_c o_h o_w"), BLOCK=BLOCK_ELEMENTS,
            )
        else:
            _unpool_group_kernel[(sum(counts),)](**args, start1=counts[0], BLOCK=BLOCK_ELEMENTS)
        outs += results
    return outs
