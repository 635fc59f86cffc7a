"""Norms and pooling of the affinity losses: inverse norms of rows, the backward through a
row's normalisation (up to eight per launch), adaptive average pooling (with the pooled
channels' norms) and its gradient. See ``affinity.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv, strides
from .affinity_tiles import BLOCK_ELEMENTS, BLOCK_K, BLOCK_ROWS, _tile, _vec
from .launch import launch


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
def _norm_bwd_rows(
    f_ptr, r_ptr, gx_ptr, out_ptr, block, b, R, K, W,
    f_b, f_c, f_h, f_w, g_b, g_c, g_h, g_w,
    EPS: tl.constexpr, PIX_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Rows ``block`` of sample b: gradient for f from the gradient gx of x = f / max(|row|,
    eps); gx and out share the strides g_* (out may alias gx). ACC: added to what out
    holds (the gradient of f from other terms) instead of overwriting it."""
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
        if ACC:
            df = tl.load(out_ptr + b * g_b + off, mask=mask, other=0.0).to(tl.float32) + df
        tl.store(out_ptr + b * g_b + off, df.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    f_ptr, r_ptr, gx_ptr, out_ptr, R, K, W,
    f_b, f_c, f_h, f_w, g_b, g_c, g_h, g_w,
    EPS: tl.constexpr, PIX_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    _norm_bwd_rows(f_ptr, r_ptr, gx_ptr, out_ptr, tl.program_id(0),
                   tl.program_id(1).to(tl.int64), R, K, W, f_b, f_c, f_h, f_w, g_b, g_c, g_h,
                   g_w, EPS, PIX_ROWS, BLOCK_R, BLOCK_K, ACC)


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
    ACC0: tl.constexpr, ACC1: tl.constexpr, ACC2: tl.constexpr, ACC3: tl.constexpr, ACC4: tl.constexpr, ACC5: tl.constexpr, ACC6: tl.constexpr, ACC7: tl.constexpr,
):
    # Up to eight norm backwards in one launch: grid axis 0 runs over the row blocks of one
    # slot after another, axis 1 over the samples; a branch per slot.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < start1:
        _norm_bwd_rows(f0, r0, gx0, o0, pid, b, R0, K0, W0,
                       f0_b, f0_c, f0_h, f0_w, g0_b, g0_c, g0_h, g0_w,
                       EPS, PIX0, BLOCK_R, BLOCK_K, ACC0)
    elif pid < start2:
        _norm_bwd_rows(f1, r1, gx1, o1, pid - start1, b, R1, K1, W1,
                       f1_b, f1_c, f1_h, f1_w, g1_b, g1_c, g1_h, g1_w,
                       EPS, PIX1, BLOCK_R, BLOCK_K, ACC1)
    elif pid < start3:
        _norm_bwd_rows(f2, r2, gx2, o2, pid - start2, b, R2, K2, W2,
                       f2_b, f2_c, f2_h, f2_w, g2_b, g2_c, g2_h, g2_w,
                       EPS, PIX2, BLOCK_R, BLOCK_K, ACC2)
    elif pid < start4:
        _norm_bwd_rows(f3, r3, gx3, o3, pid - start3, b, R3, K3, W3,
                       f3_b, f3_c, f3_h, f3_w, g3_b, g3_c, g3_h, g3_w,
                       EPS, PIX3, BLOCK_R, BLOCK_K, ACC3)
    elif pid < start5:
        _norm_bwd_rows(f4, r4, gx4, o4, pid - start4, b, R4, K4, W4,
                       f4_b, f4_c, f4_h, f4_w, g4_b, g4_c, g4_h, g4_w,
                       EPS, PIX4, BLOCK_R, BLOCK_K, ACC4)
    elif pid < start6:
        _norm_bwd_rows(f5, r5, gx5, o5, pid - start5, b, R5, K5, W5,
                       f5_b, f5_c, f5_h, f5_w, g5_b, g5_c, g5_h, g5_w,
                       EPS, PIX5, BLOCK_R, BLOCK_K, ACC5)
    elif pid < start7:
        _norm_bwd_rows(f6, r6, gx6, o6, pid - start6, b, R6, K6, W6,
                       f6_b, f6_c, f6_h, f6_w, g6_b, g6_c, g6_h, g6_w,
                       EPS, PIX6, BLOCK_R, BLOCK_K, ACC6)
    else:
        _norm_bwd_rows(f7, r7, gx7, o7, pid - start7, b, R7, K7, W7,
                       f7_b, f7_c, f7_h, f7_w, g7_b, g7_c, g7_h, g7_w,
                       EPS, PIX7, BLOCK_R, BLOCK_K, ACC7)


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
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    # out[b, c, h, w] = sum over the (at most 2 x 2) bins holding (h, w) of g / bin size
    # (ACC: added to what out holds); g (B, C, H_out, W_out) fp32 contiguous, H_out <= H_in
    # and W_out <= W_in.
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
    if ACC:
        acc = tl.load(out, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpool_kernel(
    g_ptr, out_ptr, total, C, H_in, W_in, H_out, W_out,
    o_b, o_c, o_h, o_w,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    _unpool_block(g_ptr, out_ptr, tl.program_id(0), total, C, H_in, W_in, H_out, W_out,
                  o_b, o_c, o_h, o_w, BLOCK, ACC)


@triton.jit
def _unpool_group_kernel(
    g0, o0, total0, C0, Hi0, Wi0, Ho0, Wo0, o0_b, o0_c, o0_h, o0_w,
    g1, o1, total1, C1, Hi1, Wi1, Ho1, Wo1, o1_b, o1_c, o1_h, o1_w,
    start1, BLOCK: tl.constexpr, ACC0: tl.constexpr, ACC1: tl.constexpr,
):
    # Two unpoolings in one launch: the blocks of the first, then those of the second.
    pid = tl.program_id(0)
    if pid < start1:
        _unpool_block(g0, o0, pid, total0, C0, Hi0, Wi0, Ho0, Wo0, o0_b, o0_c, o0_h, o0_w,
                      BLOCK, ACC0)
    else:
        _unpool_block(g1, o1, pid - start1, total1, C1, Hi1, Wi1, Ho1, Wo1, o1_b, o1_c, o1_h,
                      o1_w, BLOCK, ACC1)


# --------------------------------------------------------------------------- launchers


def inv_norms(x: Tensor, pix_rows: bool, eps: float) -> Tensor:
    """(B, R) float32 inverse norms of the rows (pixels or channels) of x (B, C, H, W)."""
    B, C, H, W = x.shape
    R, K = (H * W, C) if pix_rows else (C, H * W)
    out = torch.empty((B, R), device=x.device, dtype=torch.float32)
    launch(_inv_norm_kernel, (cdiv(R, BLOCK_ROWS), B), dict(
        x_ptr=x, out_ptr=out, R=R, K=K, W=W, **strides(x, "s_b s_c s_h s_w"),
        EPS=eps, PIX_ROWS=pix_rows, BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K))
    return out


def norm_backward(f: Tensor, r: Tensor, gx: Tensor, pix_rows: bool, eps: float,
                  out: Tensor | None = None) -> Tensor:
    """Gradient for f from the gradient gx of x = f / max(|row|, eps); in place when out is
    None (gx must then be float32 and is overwritten); out has gx's strides."""
    return norm_backward_group([(f, r, gx, pix_rows, out)], eps)[0]


NORM_GROUP = 8  # norm backwards per launch


def _batches(targets: list[tuple[Tensor, Tensor | None]], size: int) -> list[list[int]]:
    """Jobs ``(writes, adds_to)`` in order, cut into launches of at most ``size`` such that
    no job adds to a tensor that an earlier job of its launch writes or adds to (the
    programs of one launch run in any order)."""
    batches: list[list[int]] = []
    written: list[Tensor] = []
    for k, (writes, adds_to) in enumerate(targets):
        if (not batches or len(batches[-1]) == size
                or (adds_to is not None and any(adds_to is w for w in written))):
            batches.append([])
            written = []
        batches[-1].append(k)
        written.append(writes)
    return batches


def norm_backward_group(jobs: list[tuple], eps: float) -> list[Tensor]:
    """:func:`norm_backward` of every ``(f, r, gx, pix_rows, out)`` or ``(f, r, gx,
    pix_rows, None, acc)``, up to eight per launch (one launch, a branch per job). ``acc``:
    the gradient is added into it, in place (f's dtype and shape, gx's strides), and it is
    the job's result; a job adding to the result of an earlier job runs in a later launch.
    Returns each job's result tensor."""
    results = []
    for job in jobs:
        f, _, gx, _, out, *acc = job
        acc = acc[0] if acc else None
        if acc is not None:
            if out is not None:
                raise ValueError("norm_backward: give out or acc, not both")
            if acc.shape != f.shape or acc.stride() != gx.stride() or acc.dtype != f.dtype:
                raise ValueError(f"norm_backward: acc must have f's shape {tuple(f.shape)} "
                                 f"and dtype {f.dtype} and gx's strides {gx.stride()}, got "
                                 f"{tuple(acc.shape)}, {acc.dtype}, {acc.stride()}")
            results.append(acc)
        else:
            results.append(gx if out is None else out)
            if results[-1].stride() != gx.stride():
                raise ValueError("norm_backward: out must have gx's strides")
    adds = [job[5] if len(job) > 5 else None for job in jobs]
    B = jobs[0][0].shape[0] if jobs else 0
    for picked in _batches(list(zip(results, adds, strict=True)), NORM_GROUP):
        slots = picked + [picked[-1]] * (NORM_GROUP - len(picked))
        args, counts = {}, []
        for j, k in enumerate(slots):
            f, r, gx, pix_rows = jobs[k][:4]
            _, C, H, W = f.shape
            R, K = (H * W, C) if pix_rows else (C, H * W)
            counts.append(cdiv(R, BLOCK_ROWS) if j < len(picked) else 0)
            args.update({f"f{j}": f, f"r{j}": r, f"gx{j}": gx, f"o{j}": results[k],
                         f"R{j}": R, f"K{j}": K, f"W{j}": W, f"PIX{j}": pix_rows,
                         f"ACC{j}": adds[k] is not None,
                         **strides(f, f"f{j}_b f{j}_c f{j}_h f{j}_w"),
                         **strides(gx, f"g{j}_b g{j}_c g{j}_h g{j}_w")})
        starts = {f"start{i}": sum(counts[:i]) for i in range(1, NORM_GROUP)}
        if len(picked) == 1:
            k = picked[0]
            f, r, gx, pix_rows = jobs[k][:4]
            launch(_norm_bwd_kernel, (counts[0], B), dict(
                f_ptr=f, r_ptr=r, gx_ptr=gx, out_ptr=results[k], R=args["R0"], K=args["K0"],
                W=args["W0"], **strides(f, "f_b f_c f_h f_w"),
                **strides(gx, "g_b g_c g_h g_w"), EPS=eps, PIX_ROWS=pix_rows,
                BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K, ACC=adds[k] is not None))
        else:
            launch(_norm_bwd_group_kernel, (sum(counts), B), dict(
                **args, **starts, EPS=eps, BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K))
    return results


def _max_bin(n_in: int, n_out: int) -> int:
    return max(-(-(i + 1) * n_in // n_out) - (i * n_in) // n_out for i in range(n_out))


def pool(f: Tensor, size: tuple[int, int]) -> Tensor:
    """adaptive_avg_pool2d(f, size) as a float32 contiguous (B, C, h, w) tensor."""
    B, C, H, W = f.shape
    h, w = size
    out = torch.empty((B, C, h, w), device=f.device, dtype=torch.float32)
    launch(_pool_kernel, (cdiv(out.numel(), BLOCK_ELEMENTS),), dict(
        f_ptr=f, out_ptr=out, total=out.numel(), C=C, H_in=H, W_in=W, H_out=h, W_out=w,
        **strides(f, "f_b f_c f_h f_w"),
        MAX_BH=_max_bin(H, h), MAX_BW=_max_bin(W, w), BLOCK=BLOCK_ELEMENTS))
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
            counts.append(cdiv(C, BLOCK_ROWS) if j < len(picked) else 0)
            args.update({f"f{j}": f, f"o{j}": pooled, f"r{j}": r, f"C{j}": C, f"Hi{j}": H,
                         f"Wi{j}": W, f"Ho{j}": h, f"Wo{j}": w,
                         **strides(f, f"f{j}_b f{j}_c f{j}_h f{j}_w"),
                         f"BH{j}": _max_bin(H, h), f"BW{j}": _max_bin(W, w)})
        starts = [sum(counts[:i]) for i in range(1, POOL_GROUP)]
        launch(_pool_norms_kernel, (sum(counts), B), dict(
            **args, start1=starts[0], start2=starts[1], start3=starts[2],
            EPS=eps, BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K))
        results += [outs[k] for k in picked]
    return results


def unpool(g: Tensor, like: Tensor) -> Tensor:
    """Gradient of adaptive_avg_pool2d for input ``like`` from g (B, C, h, w) float32."""
    return unpool_group([(g, like)])[0]


def unpool_group(jobs: list[tuple]) -> list[Tensor]:
    """:func:`unpool` of every ``(g, like)`` or ``(g, like, acc)``, two per launch. ``acc``
    (like's shape and dtype, any strides): the gradient is added into it, in place, and it
    is the job's result; a job adding to the result of an earlier job runs in a later
    launch."""
    results = []
    for g, like, *acc in jobs:
        if acc and acc[0] is not None:
            if acc[0].shape != like.shape or acc[0].dtype != like.dtype:
                raise ValueError(f"unpool: acc must have the shape {tuple(like.shape)} and "
                                 f"dtype {like.dtype} of the pooled input, got "
                                 f"{tuple(acc[0].shape)}, {acc[0].dtype}")
            results.append(acc[0])
        else:
            results.append(torch.empty(like.shape, device=g.device, dtype=like.dtype))
    adds = [job[2] if len(job) > 2 else None for job in jobs]
    for picked in _batches(list(zip(results, adds, strict=True)), 2):
        args, counts = {}, []
        for j, k in enumerate(picked):
            g, like = jobs[k][:2]
            out = results[k]
            _, C, H, W = like.shape
            h, w = g.shape[2:]
            counts.append(cdiv(out.numel(), BLOCK_ELEMENTS))
            args.update({f"g{j}": g, f"o{j}": out, f"total{j}": out.numel(), f"C{j}": C,
                         f"Hi{j}": H, f"Wi{j}": W, f"Ho{j}": h, f"Wo{j}": w,
                         f"ACC{j}": adds[k] is not None,
                         **strides(out, f"o{j}_b o{j}_c o{j}_h o{j}_w")})
        if len(picked) == 1:
            launch(_unpool_kernel, (counts[0],), dict(
                g_ptr=args["g0"], out_ptr=results[picked[0]], total=args["total0"],
                C=args["C0"], H_in=args["Hi0"], W_in=args["Wi0"], H_out=args["Ho0"],
                W_out=args["Wo0"], **strides(results[picked[0]], "o_b o_c o_h o_w"),
                BLOCK=BLOCK_ELEMENTS, ACC=args["ACC0"]))
        else:
            launch(_unpool_group_kernel, (sum(counts),),
                   dict(**args, start1=counts[0], BLOCK=BLOCK_ELEMENTS))
    return results
