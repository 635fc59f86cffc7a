"""The Gram path of intra-affinity l2 (the loss from C x C Grams, which its forward also
stores for the backward, and their products with the features) and the inter-affinity
backward's scaled products. See ``affinity.py``.
"""

from __future__ import annotations

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
    _norms,
    _out_tile,
    _pow2,
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


# --------------------------------------------------------------------------- launchers


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
    nt = cdiv(C, bi)
    pairs = nt * (nt + 1) // 2
    out = torch.empty((B, pairs), device=s.device, dtype=torch.float32)
    grams = tuple(torch.empty((B, C, C), device=s.device, dtype=torch.float32)
                  for _ in range(2 * store))
    # Pointers of Grams not stored are given ``out``: the kernel does not touch them.
    g = grams + (out,) * (4 - len(grams))
    launch(_gram_loss_kernel, (pairs, B), dict(
        s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, out_ptr=out,
        gss_ptr=g[0], gsd_ptr=g[1], gts_ptr=g[2], gtd_ptr=g[3],
        C=C, N=H * W, W=W, NT=nt,
        **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"),
        STORE=store, BI=bi, BK=_pow2(H * W, hi=BLOCK_K), PRECISION=precision),
        num_warps=8 if bi >= 64 else 4)
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
    grid = (cdiv(C, bi), cdiv(N, bn), B)
    outs = []
    for g1, g2, sign in ((grams[0], grams[1], 1.0), (*grams[2:4], -1.0))[: 2 if teacher else 1]:
        out = torch.empty((B, C, H, W), device=s.device, dtype=torch.float32)
        launch(_gram_apply_kernel, grid, dict(
            s_ptr=s, t_ptr=t, rs_ptr=r_s, rt_ptr=r_t, g1_ptr=g1, g2_ptr=g2, out_ptr=out,
            g_ptr=grad_loss, coef=sign * coef, C=C, N=N, W=W,
            **strides(s, "s_b s_c s_h s_w"), **strides(t, "t_b t_c t_h t_w"), BI=bi, BN=bn,
            BK=_pow2(C, hi=BLOCK_K), PRECISION=precision))
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
