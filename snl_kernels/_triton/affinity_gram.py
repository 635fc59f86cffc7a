"""The Gram path of intra-affinity l2 (the loss from C x C Grams, which its forward also
stores for the backward, and their products with the features) and the inter-affinity
backward's scaled products. See ``affinity.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv, gpu_config, strides
from .affinity_tiles import (
    BLOCK_GRAM,
    BLOCK_GRAM_GPU,
    BLOCK_K,
    INTERPRETED,
    _dot,
    _dot_ready,
    _inv_norm_of,
    _norms,
    _out_tile,
    _pow2,
    _ready,
    _tf32,
    _tile,
    _tiles,
    _vec,
)
from .launch import launch


@triton.jit
def _store_pair(ptr, base, C, ci, cj, tile, mirror, mirrored):
    """Tile (I, J) of a (B, C, C) matrix, and if ``mirrored`` its tile (J, I), whose [j, i] is
    ``mirror[i, j]``: stored through transposed addresses, no transpose in registers."""
    mask = (ci < C)[:, None] & (cj < C)[None, :]
    tl.store(ptr + base + ci[:, None] * C + cj[None, :], tile, mask=mask)
    if mirrored:
        tl.store(ptr + base + cj[None, :] * C + ci[:, None], mirror, mask=mask)


@triton.jit
def _gram_prepare_kernel(
    s_ptr, t_ptr, rs_ptr, rt_ptr, ed_ptr, C, N, W,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    EPS: tl.constexpr, PRECISION: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):
    # Grid (pixel blocks, samples); BC >= C: a program holds every channel of its BP pixels
    # in registers, so the features are read once. Writes the pixels' inverse norms as
    # _inv_norm_kernel does (negative for a zero pixel) and, per sample, the (2C, N) matrix
    # [E; D] of E = X_S + X_T and D = X_S - X_T (X: pixels scaled by their inverse norms),
    # pixels contiguous, each value as the loss kernel's products take it (``_ready``).
    b = tl.program_id(1).to(tl.int64)
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    cs = tl.arange(0, BC)
    s = _tile(s_ptr + b * s_b, cs, rp, C, N, W, s_c, s_h, s_w, False)
    t = _tile(t_ptr + b * t_b, cs, rp, C, N, W, t_c, t_h, t_w, False)
    r_s = _inv_norm_of(s, EPS, 0)
    r_t = _inv_norm_of(t, EPS, 0)
    tl.store(rs_ptr + b * N + rp, r_s, mask=rp < N)
    tl.store(rt_ptr + b * N + rp, r_t, mask=rp < N)
    xs = s * r_s[None, :]
    xt = t * r_t[None, :]
    mask = (cs < C)[:, None] & (rp < N)[None, :]
    off = (b * 2 * C + cs[:, None]) * N + rp[None, :]
    tl.store(ed_ptr + off, _ready(xs + xt, PRECISION), mask=mask)
    tl.store(ed_ptr + off + C * N, _ready(xs - xt, PRECISION), mask=mask)


@triton.jit
def _ed_rows(ptr, rows, ks, C, N):
    """(rows, ks) tile of a (C, N) matrix of [E; D], pixels ks contiguous."""
    mask = (rows < C)[:, None] & (ks < N)[None, :]
    return tl.load(ptr + rows[:, None] * N + ks[None, :], mask=mask, other=0.0)


@triton.jit
def _ed_cols(ptr, cols, ks, C, N):
    """(ks, cols) tile of a (C, N) matrix of [E; D]: the transposed tile, read as it is."""
    mask = (ks < N)[:, None] & (cols < C)[None, :]
    return tl.load(ptr + cols[None, :] * N + ks[:, None], mask=mask, other=0.0)


@triton.jit
def _dot_prepared(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b of operands already rounded to PRECISION's (``_ready``): "tf32" or
    "ieee"."""
    if PRECISION == "tf32":
        out = tl.dot(a, b, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out


@triton.jit
def _gram_loss_kernel(
    s_ptr, t_ptr, rs_ptr, rt_ptr, ed_ptr, out_ptr, ps_ptr, qs_ptr, pt_ptr, qt_ptr,
    C, N, W, NT,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    STORE: tl.constexpr, PREPARED: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One tile pair (I, J), I <= J, of the C x C Grams of E = X_S + X_T and D = X_S - X_T
    # (rows: channels; the reduction runs over pixels scaled by their inverse norms). Since
    # X_S^T X_S - X_T^T X_T = (E^T D + D^T E) / 2, ||Delta||^2 = (<G_EE, G_DD> + <G_ED, G_DE>)
    # / 2. G_EE and G_DD are symmetric and G_ED(J, I) = G_DE(I, J)^T, so the tile (I, J)
    # with I < J also stands for (J, I): weight 1 there, 1/2 on the diagonal. Four products
    # per step, and no tile pair is formed twice.
    # STORE >= 1 also writes the backward's Grams P_S = X_S E^T / 2 and Q_S = X_S D^T / 2
    # (and, STORE = 2, P_T = X_T E^T / 2 and Q_T = X_T D^T / 2), tiles (I, J) and (J, I),
    # from the same four products (X_S = (E + D) / 2, X_T = (E - D) / 2), as operands
    # ready for the apply kernel's products (``_ready``): dL/dX_S is proportional to
    # X_S (E^T D + D^T E) / 2 = P_S D + Q_S E, dL/dX_T to -(P_T D + Q_T E).
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
    if PREPARED:
        # E and D as _gram_prepare_kernel wrote them (rounded to PRECISION's operands):
        # every product's operands come straight from memory, so Hopper's wgmma runs
        # asynchronously, the next step's loads in flight (the same operand values as the
        # loop below, which forms them in registers and waits for each step's products).
        ed_base = ed_ptr + b * 2 * C * N
        for k0 in range(0, N, BK):
            ks = k0 + tl.arange(0, BK)
            e_i = _ed_rows(ed_base, ci, ks, C, N)
            d_i = _ed_rows(ed_base + C * N, ci, ks, C, N)
            e_j = _ed_cols(ed_base, cj, ks, C, N)
            d_j = _ed_cols(ed_base + C * N, cj, ks, C, N)
            g_ee = _dot_prepared(e_i, e_j, g_ee, PRECISION)
            g_dd = _dot_prepared(d_i, d_j, g_dd, PRECISION)
            g_ed = _dot_prepared(e_i, d_j, g_ed, PRECISION)
            g_de = _dot_prepared(d_i, e_j, g_de, PRECISION)
    else:
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
        _store_pair(ps_ptr, base, C, ci, cj, _ready((g_ee + g_de) * 0.25, PRECISION),
                    _ready((g_ee + g_ed) * 0.25, PRECISION), mirror)
        _store_pair(qs_ptr, base, C, ci, cj, _ready((g_ed + g_dd) * 0.25, PRECISION),
                    _ready((g_de + g_dd) * 0.25, PRECISION), mirror)
        if STORE == 2:
            _store_pair(pt_ptr, base, C, ci, cj, _ready((g_ee - g_de) * 0.25, PRECISION),
                        _ready((g_ee - g_ed) * 0.25, PRECISION), mirror)
            _store_pair(qt_ptr, base, C, ci, cj, _ready((g_ed - g_dd) * 0.25, PRECISION),
                        _ready((g_de - g_dd) * 0.25, PRECISION), mirror)


@triton.jit
def _gram_apply_kernel(
    s_ptr, t_ptr, rs_ptr, rt_ptr, p_ptr, q_ptr, out_ptr, g_ptr, coef,
    C, N, W,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # out[c, n] = g coef (P D + Q E)[c, n], D = X_S - X_T, E = X_S + X_T, P and Q as the loss
    # kernel stored them; fp32 (B, C, N) output. Formed as its transpose, a (BN pixels, BI
    # channels) tile: the operand made in registers (D^T, E^T: pixels scaled by their inverse
    # norms) is the product's first, the stored Grams its second, read as they are; the two
    # products keep accumulators of their own (one chained into the other would wait for
    # every wgmma group).
    b, ci, ns = _out_tile(BI, BN)
    r_s, r_t = _norms(rs_ptr, rt_ptr, b, ns, N)
    acc_d = tl.zeros([BN, BI], dtype=tl.float32)
    acc_e = tl.zeros([BN, BI], dtype=tl.float32)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        gmask = (ks < C)[:, None] & (ci < C)[None, :]
        goff = (b * C + ci[None, :]) * C + ks[:, None]
        p = tl.load(p_ptr + goff, mask=gmask, other=0.0)
        q = tl.load(q_ptr + goff, mask=gmask, other=0.0)
        xs = _tile(s_ptr + b * s_b, ns, ks, N, C, W, s_c, s_h, s_w, True) * r_s[:, None]
        xt = _tile(t_ptr + b * t_b, ns, ks, N, C, W, t_c, t_h, t_w, True) * r_t[:, None]
        acc_d = _dot_ready(xs - xt, p, acc_d, PRECISION)
        acc_e = _dot_ready(xs + xt, q, acc_e, PRECISION)
    mask = (ns < N)[:, None] & (ci < C)[None, :]
    tl.store(out_ptr + (b * C + ci[None, :]) * N + ns[:, None],
             tl.load(g_ptr) * coef * (acc_d + acc_e), mask=mask)


@triton.jit
def _gram_apply_norm_kernel(
    s_ptr, t_ptr, rs_ptr, rt_ptr, p_ptr, q_ptr, out_ptr, g_ptr, coef,
    C, N, W,
    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w,
    TEACHER: tl.constexpr, EPS: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, PRECISION: tl.constexpr,
):
    # Grid (pixel blocks, samples); BC >= C: a program forms every channel of its BN pixels.
    # dx = g coef (P D + Q E), as _gram_apply_kernel forms it (transposed, (BN, BC)), in one
    # accumulator (a loop for each product), then in the epilogue back through x = f r, f
    # the student's (TEACHER: the teacher's) features: df = r (dx - x <x, dx>), as
    # _norm_bwd_rows does, written once, (B, C, N) in out's dtype. No dx in memory, and the
    # features the epilogue reads are those the loops just read.
    b = tl.program_id(1).to(tl.int64)
    ns = tl.program_id(0) * BN + tl.arange(0, BN)
    cs = tl.arange(0, BC)
    r_s, r_t = _norms(rs_ptr, rt_ptr, b, ns, N)
    s_base = s_ptr + b * s_b
    t_base = t_ptr + b * t_b
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        goff = (b * C + cs[None, :]) * C + ks[:, None]
        p = tl.load(p_ptr + goff, mask=(ks < C)[:, None] & (cs < C)[None, :], other=0.0)
        xs = _tile(s_base, ns, ks, N, C, W, s_c, s_h, s_w, True) * r_s[:, None]
        xt = _tile(t_base, ns, ks, N, C, W, t_c, t_h, t_w, True) * r_t[:, None]
        acc = _dot_ready(xs - xt, p, acc, PRECISION)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        goff = (b * C + cs[None, :]) * C + ks[:, None]
        q = tl.load(q_ptr + goff, mask=(ks < C)[:, None] & (cs < C)[None, :], other=0.0)
        xs = _tile(s_base, ns, ks, N, C, W, s_c, s_h, s_w, True) * r_s[:, None]
        xt = _tile(t_base, ns, ks, N, C, W, t_c, t_h, t_w, True) * r_t[:, None]
        acc = _dot_ready(xs + xt, q, acc, PRECISION)
    dx = tl.load(g_ptr) * coef * acc
    if TEACHER:
        f = _tile(t_base, ns, cs, N, C, W, t_c, t_h, t_w, True)
        r = tl.abs(r_t)
    else:
        f = _tile(s_base, ns, cs, N, C, W, s_c, s_h, s_w, True)
        r = tl.abs(r_s)  # negative: a zero pixel (see _inv_norm_kernel)
    # x . dx = r (f . dx); the projection term drops where the norm was clamped.
    ss = tl.sum(f * f, axis=1)
    proj = tl.where(tl.sqrt(ss) > EPS, r * r * tl.sum(f * dx, axis=1), 0.0)
    df = r[:, None] * dx - (proj * r)[:, None] * f
    mask = (ns < N)[:, None] & (cs < C)[None, :]
    tl.store(out_ptr + (b * C + cs[None, :]) * N + ns[:, None],
             df.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_mm_tile(
    g_ptr, y_ptr, ry_ptr, out_ptr, alpha, M, N, K, W,
    g_b, g_m, g_k, y_b, y_c, y_h, y_w, pid_m, pid_n, b,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output tile (pid_m, pid_n) of sample b of out = alpha G Y^ (see the kernel), formed as
    its transpose: Y^'s pixels scaled in registers are the product's first operand, G (whose
    values are ``_ready`` at PRECISION) its second, read as it is."""
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    acc_lo = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        g = tl.load(g_ptr + b * g_b + rm[None, :] * g_m + ks[:, None] * g_k,
                    mask=(ks < K)[:, None] & (rm < M)[None, :], other=0.0)
        y = _tile(y_ptr + b * y_b, rn, ks, N, K, W, y_c, y_h, y_w, True)
        y = y * _vec(ry_ptr + b * K, ks, K)[None, :]
        if PRECISION == "tf32x3-exact-b":
            # G holds tf32 values exactly (l1's signs): tf32x3 is the high and low parts of
            # Y^ against G as loaded, an accumulator each (no wait for the products).
            y_hi = _tf32(y)
            acc = tl.dot(y_hi, g, acc, input_precision="tf32")
            acc_lo = tl.dot(_tf32(y - y_hi), g, acc_lo, input_precision="tf32")
        else:
            acc = _dot_ready(y, g, acc, PRECISION)
    if PRECISION == "tf32x3-exact-b":
        acc = acc + acc_lo
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    tl.store(out_ptr + (b * M + rm[None, :]) * N + rn[:, None], alpha * acc, mask=mask)


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


# --------------------------------------------------------------------------- launchers


#: SMs of the GPU that CPU tensors stand in for (an H200, as in the compile model).
STAND_IN_SMS = 132


@functools.cache
def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return STAND_IN_SMS


def gram_loss_warps(programs: int, bi: int, device: torch.device) -> int:
    """Warps of the Gram loss kernel: 64-row tiles at 4 warps (255 registers, two programs
    per SM) where every program fits on the device at once, two per SM (WRN50 level 1 at
    B = 16: 160 programs, which at one per SM would leave a second wave of 28); else 8 (one
    per SM, 175 registers)."""
    if bi < 64:
        return 4
    return 4 if programs <= 2 * _sms(device) else 8


def gram_loss_block(C: int) -> int:
    """Rows of a Gram tile, of the loss and of the gradient's products (the configuration in
    force, ``gpu_config``)."""
    return _pow2(C, hi=BLOCK_GRAM_GPU if gpu_config(INTERPRETED) else BLOCK_GRAM)


#: Channels up to which the Gram path's operands are prepared (a program holds every
#: channel of its pixels in registers: PREPARE_ELEMENTS per feature).
PREPARE_MAX_C = 1024
PREPARE_ELEMENTS = 4096


def prepared_applies(channels: int, precision: str) -> bool:
    """Whether :func:`gram_prepare` serves a Gram-path level: operands rounded once serve
    "tf32" and "ieee" products ("tf32x3" splits its operands in the loss kernel)."""
    return precision in ("tf32", "ieee") and channels <= PREPARE_MAX_C


def gram_prepare(s: Tensor, t: Tensor, eps: float,
                 precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """(ed, r_s, r_t): the pixels' inverse norms of s and t (B, N), as :func:`inv_norms`
    gives them (up to the order of the sum of squares), and per sample the (2C, N) matrix
    [E; D] (E = X_S + X_T, D = X_S - X_T) rounded to ``precision``'s operands, which
    :func:`gram_loss` reads with ``prepared``: one launch reading the features once.
    Memory: 2 B C N float32 while the loss runs (134 MB at WRN50 level 1, B = 16)."""
    B, C, H, W = s.shape
    N = H * W
    if not prepared_applies(C, precision):
        raise ValueError(f"gram_prepare: C = {C} with precision {precision!r} is not "
                         f"prepared (C <= {PREPARE_MAX_C}, tf32 or ieee)")
    bc = _pow2(C)
    bp = max(PREPARE_ELEMENTS // bc, 4)
    ed = torch.empty((B, 2 * C, N), device=s.device, dtype=torch.float32)
    r_s = torch.empty((B, N), device=s.device, dtype=torch.float32)
    r_t = torch.empty_like(r_s)
    launch(_gram_prepare_kernel, (cdiv(N, bp), B), dict(
        s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, ed_ptr=ed, C=C, N=N, W=W,
        **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"),
        EPS=eps, PRECISION=precision, BP=bp, BC=bc))
    return ed, r_s, r_t


def gram_loss(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, precision: str,
              store: int = 0, prepared: Tensor | None = None,
              ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Per-tile-pair sums of ||Delta||^2 (B, tile pairs of the upper triangle), from the
    Grams of E = X_S + X_T and D = X_S - X_T (``_gram_loss_kernel``); with ``store`` 1 also
    the backward's (B, C, C) float32 Grams (P_S, Q_S), with 2 (P_S, Q_S, P_T, Q_T), rounded
    to ``precision``'s operands (see the kernel). ``prepared``: [E; D] as
    :func:`gram_prepare` wrote them with r_s and r_t (the same values, read instead of
    formed)."""
    B, C, H, W = s.shape
    bi = gram_loss_block(C)
    nt = cdiv(C, bi)
    pairs = nt * (nt + 1) // 2
    out = torch.empty((B, pairs), device=s.device, dtype=torch.float32)
    grams = tuple(torch.empty((B, C, C), device=s.device, dtype=torch.float32)
                  for _ in range(2 * store))
    # Pointers of Grams not stored are given ``out``: the kernel does not touch them.
    g = grams + (out,) * (4 - len(grams))
    launch(_gram_loss_kernel, (pairs, B), dict(
        s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t,
        ed_ptr=out if prepared is None else prepared, out_ptr=out,
        ps_ptr=g[0], qs_ptr=g[1], pt_ptr=g[2], qt_ptr=g[3],
        C=C, N=H * W, W=W, NT=nt,
        **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"),
        STORE=store, PREPARED=prepared is not None, BI=bi, BK=_pow2(H * W, hi=BLOCK_K),
        PRECISION=precision), num_warps=gram_loss_warps(pairs * B, bi, s.device))
    return out, grams or None


def gram_grad(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, grad_loss: Tensor, coef: float,
              teacher: bool, precision: str, grams: tuple[Tensor, ...] | None = None,
              prepared: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """coef g (P_S D + Q_S E) and -coef g (P_T D + Q_T E), fp32 (B, C, H, W) (the
    gradients for X_S and X_T; ``_gram_loss_kernel`` says what P and Q are).

    ``grams``: the Grams the forward stored (:func:`gram_loss` with ``store``, 2 for the
    teacher's gradient); None forms them again with the loss kernel (from ``prepared``
    operands where given)."""
    B, C, H, W = s.shape
    N = H * W
    if grams is None:
        grams = gram_loss(s, t, r_s, r_t, precision, store=2 if teacher else 1,
                          prepared=prepared)[1]
    bi = gram_loss_block(C)
    bn = _pow2(N, hi=_tiles()[0])
    grid = (cdiv(C, bi), cdiv(N, bn), B)
    outs = []
    for p, q, sign in ((grams[0], grams[1], 1.0), (*grams[2:4], -1.0))[: 2 if teacher else 1]:
        out = torch.empty((B, C, H, W), device=s.device, dtype=torch.float32)
        launch(_gram_apply_kernel, grid, dict(
            s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, p_ptr=p, q_ptr=q, out_ptr=out,
            g_ptr=grad_loss, coef=sign * coef, C=C, N=N, W=W,
            **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"), BI=bi, BN=bn,
            BK=_pow2(C, hi=BLOCK_K), PRECISION=precision))
        outs.append(out)
    return outs[0], outs[1] if teacher else None


#: Channels up to which the Gram path's backward forms a pixel's gradient over all channels
#: in one program, with the norm backward in its epilogue (an fp32 accumulator of
#: APPLY_NORM_ELEMENTS per program).
APPLY_NORM_MAX_C = 256
APPLY_NORM_ELEMENTS = 16384


def apply_norm_applies(channels: int) -> bool:
    """Whether :func:`gram_grad_features` serves a Gram-path level of ``channels``."""
    return channels <= APPLY_NORM_MAX_C


def gram_grad_features(s: Tensor, t: Tensor, r_s: Tensor, r_t: Tensor, grad_loss: Tensor,
                       coef: float, teacher: bool, precision: str, eps: float,
                       grams: tuple[Tensor, ...] | None = None,
                       prepared: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The gradients for the features s and t (None without ``teacher``), each in its
    feature's dtype, (B, C, H, W) contiguous: :func:`gram_grad`'s gradients for the
    normalised features taken back through the pixels' normalisation
    (``norm_backward``) in the same launch (``_gram_apply_norm_kernel``), for levels where
    :func:`apply_norm_applies`."""
    B, C, H, W = s.shape
    N = H * W
    if not apply_norm_applies(C):
        raise ValueError(f"gram_grad_features: C = {C} is over {APPLY_NORM_MAX_C}")
    if grams is None:
        grams = gram_loss(s, t, r_s, r_t, precision, store=2 if teacher else 1,
                          prepared=prepared)[1]
    bc = _pow2(C)
    bn = _pow2(max(APPLY_NORM_ELEMENTS // bc, 16), hi=_tiles()[0])
    outs = []
    for f, p, q, sign, mine in ((s, grams[0], grams[1], 1.0, False),
                                (t, *grams[2:4], -1.0, True))[: 2 if teacher else 1]:
        out = torch.empty((B, C, H, W), device=s.device, dtype=f.dtype)
        launch(_gram_apply_norm_kernel, (cdiv(N, bn), B), dict(
            s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, p_ptr=p, q_ptr=q, out_ptr=out,
            g_ptr=grad_loss, coef=sign * coef, C=C, N=N, W=W,
            **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"),
            TEACHER=mine, EPS=eps, BC=bc, BN=bn, BK=_pow2(C, hi=BLOCK_K),
            PRECISION=precision), num_warps=8)
        outs.append(out)
    return outs[0], outs[1] if teacher else None


def scaled_mm(g: Tensor, y: Tensor, r_y: Tensor, alpha: float, precision: str) -> Tensor:
    """alpha g @ (y's channel rows scaled by r_y): g (B, M, C_y), y (B, C_y, h, w) ->
    float32 (B, M, h, w); products at ``precision`` (``snl_kernels/precision.py``). At
    "tf32", g must hold tf32 values (rounded to nearest, as the Delta kernel writes the
    gradient of Delta): the tensor cores take it as it is. "tf32x3-exact-b": tf32x3 where g
    holds tf32 values exactly (l1's signs), two products with g as it is."""
    return scaled_mm_group([(g, y, r_y, alpha, precision)])[0]


MM_GROUP = 4  # products per launch


def _mm_plan(g: Tensor, y: Tensor) -> dict:
    B, M, K = g.shape
    _, _, H, W = y.shape
    N = H * W
    tile = _tiles()[0]
    bm, bn = _pow2(M, hi=tile), _pow2(N, hi=tile)
    return {"M": M, "N": N, "K": K, "W": W, "H": H, "B": B, "BM": bm, "BN": bn,
            "BK": _pow2(K, hi=BLOCK_K), "tiles_m": cdiv(M, bm),
            "tiles_n": cdiv(N, bn)}


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
            launch(_scaled_mm_kernel, (p["tiles_m"], p["tiles_n"], p["B"]), dict(
                g_ptr=g, y_ptr=y, ry_ptr=r_y, out_ptr=results[k], alpha=alpha, M=p["M"],
                N=p["N"], K=p["K"], W=p["W"], **strides(g, "g_b g_m g_k"),
                **strides(y, "y_b y_c y_h y_w"), BM=p["BM"], BN=p["BN"], BK=p["BK"],
                PRECISION=precision))
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
        launch(_scaled_mm_group_kernel, (sum(counts), plans[picked[0]]["B"]), {**args, **starts})
        outs += [results[k] for k in picked]
    return outs
