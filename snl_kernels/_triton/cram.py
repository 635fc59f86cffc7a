"""Triton kernels of ``cram``; the math is in ``snl_kernels/cram.py``.

Positions p = b * N + n are cut into blocks of BLOCK_P rows; the K centres are padded to a
power of two KP >= 16 (for ``tl.dot``). The two products with the centres, ``E C^T`` (a
reduction over D) and ``A C`` (an output over D), and the backward's three, run on tensor
cores as three tf32 products ("tf32x3", about fp32; ``_dot`` in ``affinity_tiles.py``), with fp32
accumulation.

Forward, two launches:

1. ``_cram_dots_kernel``, grid (row blocks, SPLIT): ``e.c_k`` and ``|e|^2`` of a block of
   rows over one of SPLIT slices of D, into a (SPLIT, P, KP) buffer of partial sums (and
   ``|c_k|^2`` over the slice, from the first row block). SPLIT is the smallest number of
   slices that gives ``MIN_PROGRAMS`` programs (1 once the rows alone do).
2. ``_cram_fwd_kernel``, grid (row blocks, D blocks): adds the slices in a fixed order,
   forms distances, the softmax and the compactness of its rows (written once, by the
   first D block), and ``mu = a C`` over its block of D. The few (BLOCK_P, KP) softmax
   values are recomputed by each D block rather than stored and read back.

Backward, two launches:

1. ``_cram_dots_kernel`` on G_mu, grid (row blocks, SPLIT): ``G_mu,i . c_k`` in slices of D,
   as in the forward.
2. ``_cram_bwd_kernel``, one grid of two kinds of programs, which need only those sums (and
   the forward's saved assignment and distances), so one launch runs both:
   - (row blocks x D chunks): dL/da, the softmax backward and ``delta = dL/dd`` of its rows
     (the rows' share of dL/dlog_tau from the first chunk), and
     ``dL/de = 2 e sum_k delta - 2 delta C`` over its chunk of D;
   - (blocks of D x slices of the positions): ``a^T G_mu - 2 delta^T E`` over the slice for
     the block of D (and the slice's column sums of delta), into a (P slices, KP, D) buffer
     that is summed in a fixed order; ``+ 2 c_k sum_i delta_ik`` is added after. These
     programs form delta again for their rows (a few (BLOCK_P, KP) loads of values the
     first kind reads too, from L2) instead of reading it from a third launch.

No atomics anywhere: the same bits on every run. Extra memory (``workspace``) is a few
(P, KP) buffers and (slices, KP, D) partial sums: at most about 200 MB alive at once for
D = 2048, K = 256 and 64,000 positions (B = 1000 at 8 x 8), where one centre-gradient
partial per row block would have needed 8 GB.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv, gpu_config, next_power_of_2, strides
from .affinity_tiles import _dot
from .launch import launch

BLOCK_P = 32
BLOCK_D = 64
#: Programs a launch should have on a GPU: the H200's 132 SMs.
MIN_PROGRAMS = 132
#: Products of the centres: three tf32 products (``affinity._dot``), fp32 accumulation.
PRECISION = "tf32x3"


def _blocks(kp: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) for KP padded centres: the (KP, BLOCK_D) centre chunk and the
    (BLOCK_P, KP) tiles shrink as KP grows (at KP = 256 the default tiles took 75-80 s per
    kernel to compile for sm_90 and would spill registers)."""
    if kp <= 64:
        return BLOCK_P, BLOCK_D
    return (BLOCK_P if kp <= 128 else 16), max(16, 4096 // kp)


def _pad_k(k: int) -> int:
    return max(16, next_power_of_2(k))


def _split(units: int, other: int, gpu: bool) -> int:
    """How many pieces to cut ``units`` (blocks of D or of positions) into so that
    ``pieces * other >= MIN_PROGRAMS`` on a GPU (at most ``units``); 1 when ``other`` alone
    suffices. Under the interpreter, 2 when there is more than one unit, so that the tests
    add slices too."""
    if not gpu:
        return min(units, 2)
    return max(1, min(units, cdiv(MIN_PROGRAMS, other)))


def plan(B: int, D: int, N: int, K: int, gpu: bool | None = None) -> dict[str, int]:
    """Block sizes and grids of a launch: BLOCK_P, BLOCK_D, KP, row blocks, SPLIT (slices
    of D of the dot kernels), D_BLOCKS (of the row kernels, each ``D_CHUNK`` wide) and
    P_SLICES (of the centre-gradient kernel, over ``D / BLOCK_D`` blocks of D)."""
    gpu = gpu_config(INTERPRETED) if gpu is None else gpu
    kp = _pad_k(K)
    block_p, block_d = _blocks(kp)
    rows = cdiv(B * N, block_p)
    d_units = cdiv(D, block_d)
    split = _split(d_units, rows, gpu)
    d_blocks = _split(d_units, rows, gpu)
    centre_blocks = d_units
    p_slices = _split(rows, centre_blocks, gpu)
    return {"BLOCK_P": block_p, "BLOCK_D": block_d, "KP": kp, "rows": rows,
            "SPLIT": split, "D_SLICE": cdiv(d_units, split) * block_d,
            "D_BLOCKS": d_blocks, "D_CHUNK": cdiv(d_units, d_blocks) * block_d,
            "CENTRE_BLOCKS": centre_blocks, "P_SLICES": p_slices,
            "P_SLICE": cdiv(rows, p_slices) * block_p}


def workspace(B: int, D: int, N: int, K: int, gpu: bool | None = None) -> dict[str, dict]:
    """Shapes of the float32 buffers the forward and the backward allocate beyond the op's
    outputs and gradients (the launchers allocate exactly these). The forward's ``dist``
    is saved for the backward; the other buffers live for one call."""
    p = plan(B, D, N, K, gpu)
    P, KP = B * N, p["KP"]
    return {
        "forward": {"dist": (P, K), "part": (p["SPLIT"], P, KP), "e2_part": (p["SPLIT"], P),
                    "c2_part": (p["SPLIT"], KP)},
        "backward": {"part": (p["SPLIT"], P, KP),
                     "g_log_tau_partial": (p["rows"],), "g_c_partial": (p["P_SLICES"], KP, D),
                     "delta_col_partial": (p["P_SLICES"], KP)},
    }


def workspace_bytes(B: int, D: int, N: int, K: int, gpu: bool | None = None) -> int:
    """Peak bytes of :func:`workspace` alive at once: the forward's buffers, or the saved
    ``dist`` and the backward's."""
    shapes = workspace(B, D, N, K, gpu)
    size = {phase: sum(4 * math.prod(s) for s in bufs.values())
            for phase, bufs in shapes.items()}
    dist = 4 * math.prod(shapes["forward"]["dist"])
    return max(size["forward"], dist + size["backward"])


@triton.jit
def _row_offsets(offs_p, N, W, stride_b, stride_h, stride_w):
    b = (offs_p // N).to(tl.int64)
    n = offs_p % N
    return b * stride_b + (n // W) * stride_h + (n % W) * stride_w


@triton.jit
def _by_channel(offs_p, offs_c, C, N):
    """Offsets of [b, c, n] in a contiguous (B, C, N) tensor: (positions, channels)."""
    b = (offs_p // N).to(tl.int64)
    n = offs_p % N
    return (b * C)[:, None] * N + offs_c[None, :] * N + n[:, None]


@triton.jit
def _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd):
    """fp32 (KP, BLOCK_D) chunk of the centres."""
    return tl.load(c_ptr + offs_k[:, None] * stride_ck + offs_d[None, :] * stride_cd,
                   mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _rows(x_ptr, row, offs_d, mask_pd, stride_d):
    """fp32 (BLOCK_P, BLOCK_D) tile of a (B, D, h, w) tensor; ``row`` from _row_offsets."""
    return tl.load(x_ptr + row[:, None] + offs_d[None, :] * stride_d, mask=mask_pd,
                   other=0.0).to(tl.float32)


@triton.jit
def _sum_slices(part_ptr, SPLIT, P, offs_p, offs_k, mask_pk, KP: tl.constexpr):
    """sum over slices s of part[s, p, k] (a (SPLIT, P, KP) buffer), in order."""
    acc = tl.zeros(mask_pk.shape, dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + (s * P + offs_p[:, None].to(tl.int64)) * KP + offs_k[None, :],
                       mask=mask_pk, other=0.0)
    return acc


@triton.jit
def _cram_dots_kernel(
    x_ptr, c_ptr, part_ptr, x2_part_ptr, c2_part_ptr,
    P, N, W, D, K, D_SLICE,
    stride_xb, stride_xd, stride_xh, stride_xw,
    stride_ck, stride_cd,
    SQUARES: tl.constexpr,
    KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # x . c_k over slice s of D for a block of rows: part[s, p, k]; with SQUARES also |x|^2
    # (x2_part[s, p]) and, from the first row block, |c_k|^2 over the slice (c2_part[s, k]).
    s = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    row = _row_offsets(offs_p, N, W, stride_xb, stride_xh, stride_xw)
    xc = tl.zeros([BLOCK_P, KP], dtype=tl.float32)
    x2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    c2 = tl.zeros([KP], dtype=tl.float32)
    d_end = tl.minimum((s + 1) * D_SLICE, D)
    for d0 in range(s * D_SLICE, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_end
        x = _rows(x_ptr, row, offs_d, mask_p[:, None] & mask_d[None, :], stride_xd)
        c = _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd)
        xc = _dot(x, tl.trans(c), xc, PRECISION)
        if SQUARES:
            x2 += tl.sum(x * x, axis=1)
            c2 += tl.sum(c * c, axis=1)
    tl.store(part_ptr + (s * P + offs_p[:, None].to(tl.int64)) * KP + offs_k[None, :], xc,
             mask=mask_p[:, None])
    if SQUARES:
        tl.store(x2_part_ptr + s * P + offs_p, x2, mask=mask_p)
        if tl.program_id(0) == 0:
            tl.store(c2_part_ptr + s * KP + offs_k, c2)


@triton.jit
def _cram_fwd_kernel(
    c_ptr, log_tau_ptr, part_ptr, e2_part_ptr, c2_part_ptr,
    central_ptr, assign_ptr, compact_ptr, dist_ptr,
    P, N, D, K, SPLIT, D_CHUNK,
    stride_ck, stride_cd,
    KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    mask_pk = mask_p[:, None] & mask_k[None, :]
    tau = tl.exp(tl.load(log_tau_ptr).to(tl.float32))
    ec = _sum_slices(part_ptr, SPLIT, P, offs_p, offs_k, mask_pk, KP)
    e2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    c2 = tl.zeros([KP], dtype=tl.float32)
    for s in range(0, SPLIT):
        e2 += tl.load(e2_part_ptr + s * P + offs_p, mask=mask_p, other=0.0)
        c2 += tl.load(c2_part_ptr + s * KP + offs_k)
    dist = e2[:, None] - 2.0 * ec + c2[None, :]
    logits = tl.where(mask_k[None, :], -dist / tau, float("-inf"))
    # Row max subtracted first: large distances and tiny temperatures stay finite.
    logits = logits - tl.max(logits, axis=1)[:, None]
    expl = tl.exp(logits)
    a = expl / tl.sum(expl, axis=1)[:, None]
    if tl.program_id(1) == 0:
        compact = tl.sum(tl.where(mask_k[None, :], a * dist, 0.0), axis=1)
        tl.store(assign_ptr + _by_channel(offs_p, offs_k, K, N), a, mask=mask_pk)
        tl.store(dist_ptr + offs_p[:, None].to(tl.int64) * K + offs_k[None, :], dist,
                 mask=mask_pk)
        tl.store(compact_ptr + offs_p, compact, mask=mask_p)
    d_start = tl.program_id(1) * D_CHUNK
    d_end = tl.minimum(d_start + D_CHUNK, D)
    for d0 in range(d_start, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_end
        c = _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd)
        mu = _dot(a, c, tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32), PRECISION)
        tl.store(central_ptr + _by_channel(offs_p, offs_d, D, N), mu,
                 mask=mask_p[:, None] & mask_d[None, :])


@triton.jit
def _delta_rows(assign_ptr, dist_ptr, part_ptr, g_assign_ptr, g_compact_ptr, tau,
                offs_p, mask_p, offs_k, mask_k, P, N, K, SPLIT, KP: tl.constexpr):
    """A block of rows' dL/dlogits and ``delta = dL/dd`` (zero outside the rows and K)."""
    mask_pk = mask_p[:, None] & mask_k[None, :]
    pk = _by_channel(offs_p, offs_k, K, N)
    a = tl.load(assign_ptr + pk, mask=mask_pk, other=0.0)
    dist = tl.load(dist_ptr + offs_p[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask_pk,
                   other=0.0)
    g_compact = tl.load(g_compact_ptr + offs_p, mask=mask_p, other=0.0)
    # dL/da from the assignment itself, the compactness term, and mu = a @ C (G_mu . c_k,
    # summed over the slices of D).
    g_a = (tl.load(g_assign_ptr + pk, mask=mask_pk, other=0.0) + g_compact[:, None] * dist
           + _sum_slices(part_ptr, SPLIT, P, offs_p, offs_k, mask_pk, KP))
    # Softmax backward, then logits = -dist / tau.
    g_logit = a * (g_a - tl.sum(a * g_a, axis=1)[:, None])
    delta = tl.where(mask_pk, g_compact[:, None] * a - g_logit / tau, 0.0)
    return a, dist, g_logit, delta


@triton.jit
def _cram_bwd_rows(
    e_ptr, c_ptr, assign_ptr, dist_ptr, part_ptr, g_assign_ptr, g_compact_ptr, g_e_ptr,
    g_log_tau_partial_ptr, tau, row_block, d_block,
    P, N, W, D, K, SPLIT, D_CHUNK,
    stride_eb, stride_ed, stride_eh, stride_ew, stride_ck, stride_cd,
    stride_geb, stride_ged, stride_geh, stride_gew,
    KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # dL/de = 2 e sum_k delta - 2 delta C over a chunk of D for a block of rows (and, from
    # the first chunk, the rows' share of dL/dlog_tau).
    offs_p = row_block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    mask_pk = mask_p[:, None] & mask_k[None, :]
    _, dist, g_logit, delta = _delta_rows(assign_ptr, dist_ptr, part_ptr, g_assign_ptr,
                                          g_compact_ptr, tau, offs_p, mask_p, offs_k, mask_k,
                                          P, N, K, SPLIT, KP)
    delta_row = tl.sum(delta, axis=1)
    if d_block == 0:
        # sum_k dL/dl_ik = 0, so each row's distances may be taken from their minimum: the
        # same value with far less cancellation when distances are large and close together.
        d_min = tl.min(tl.where(mask_pk, dist, float("inf")), axis=1)
        d_rel = tl.where(mask_pk, dist - d_min[:, None], 0.0)
        tl.store(g_log_tau_partial_ptr + row_block,
                 tl.sum(tl.sum(g_logit * d_rel, axis=1), axis=0) / tau)
    e_row = _row_offsets(offs_p, N, W, stride_eb, stride_eh, stride_ew)
    ge_row = _row_offsets(offs_p, N, W, stride_geb, stride_geh, stride_gew)
    d_start = d_block * D_CHUNK
    d_end = tl.minimum(d_start + D_CHUNK, D)
    for d0 in range(d_start, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_end
        mask_pd = mask_p[:, None] & mask_d[None, :]
        e = _rows(e_ptr, e_row, offs_d, mask_pd, stride_ed)
        c = _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd)
        # d = |e|^2 - 2 e.c + |c|^2: dd/de = 2 (e - c).
        dc = _dot(delta, c, tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32), PRECISION)
        g_e = 2.0 * e * delta_row[:, None] - 2.0 * dc
        tl.store(g_e_ptr + ge_row[:, None] + offs_d[None, :] * stride_ged,
                 g_e.to(g_e_ptr.dtype.element_ty), mask=mask_pd)


@triton.jit
def _cram_grad_centres(
    e_ptr, g_central_ptr, assign_ptr, dist_ptr, part_ptr, g_assign_ptr, g_compact_ptr,
    g_c_partial_ptr, delta_col_partial_ptr, tau, d_block, sl,
    P, N, W, D, K, SPLIT, P_SLICE,
    stride_eb, stride_ed, stride_eh, stride_ew,
    stride_gb, stride_gd, stride_gh, stride_gw,
    KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # A block of D x a slice of the positions:
    # part[slice, k, d] = sum_p a_pk G_mu,pd - 2 delta_pk e_pd, delta formed again here.
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    acc = tl.zeros([KP, BLOCK_D], dtype=tl.float32)
    col = tl.zeros([KP], dtype=tl.float32)
    p_end = tl.minimum((sl + 1) * P_SLICE, P)
    for p0 in range(sl * P_SLICE, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_end
        mask_pd = mask_p[:, None] & mask_d[None, :]
        a, _, _, delta = _delta_rows(assign_ptr, dist_ptr, part_ptr, g_assign_ptr,
                                     g_compact_ptr, tau, offs_p, mask_p, offs_k, mask_k,
                                     P, N, K, SPLIT, KP)
        e = _rows(e_ptr, _row_offsets(offs_p, N, W, stride_eb, stride_eh, stride_ew), offs_d,
                  mask_pd, stride_ed)
        gm = _rows(g_central_ptr, _row_offsets(offs_p, N, W, stride_gb, stride_gh, stride_gw),
                   offs_d, mask_pd, stride_gd)
        acc = _dot(tl.trans(a), gm, acc, PRECISION)
        acc = _dot(tl.trans(-2.0 * delta), e, acc, PRECISION)
        col += tl.sum(delta, axis=0)
    tl.store(g_c_partial_ptr + (sl * KP + offs_k[:, None]).to(tl.int64) * D + offs_d[None, :],
             acc, mask=mask_d[None, :])
    if d_block == 0:
        tl.store(delta_col_partial_ptr + sl * KP + offs_k, col)


@triton.jit
def _cram_bwd_kernel(
    e_ptr, c_ptr, log_tau_ptr, assign_ptr, dist_ptr, part_ptr, g_assign_ptr, g_compact_ptr,
    g_central_ptr, g_e_ptr, g_log_tau_partial_ptr, g_c_partial_ptr, delta_col_partial_ptr,
    P, N, W, D, K, SPLIT, D_CHUNK, D_BLOCKS, P_SLICE, P_SLICES, ROW_PROGRAMS,
    stride_eb, stride_ed, stride_eh, stride_ew,
    stride_ck, stride_cd,
    stride_gb, stride_gd, stride_gh, stride_gw,
    stride_geb, stride_ged, stride_geh, stride_gew,
    KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # The first ROW_PROGRAMS programs: dL/de (row blocks x D chunks); the others: dL/dc
    # partials (blocks of D x slices of the positions). The two need only the dot kernel's
    # sums, so they share one launch; each forms the rows' delta it needs.
    pid = tl.program_id(0)
    tau = tl.exp(tl.load(log_tau_ptr).to(tl.float32))
    if pid < ROW_PROGRAMS:
        _cram_bwd_rows(e_ptr, c_ptr, assign_ptr, dist_ptr, part_ptr, g_assign_ptr,
                       g_compact_ptr, g_e_ptr, g_log_tau_partial_ptr, tau,
                       pid // D_BLOCKS, pid % D_BLOCKS, P, N, W, D, K, SPLIT, D_CHUNK,
                       stride_eb, stride_ed, stride_eh, stride_ew, stride_ck, stride_cd,
                       stride_geb, stride_ged, stride_geh, stride_gew,
                       KP, BLOCK_P, BLOCK_D, PRECISION)
    else:
        q = pid - ROW_PROGRAMS
        _cram_grad_centres(e_ptr, g_central_ptr, assign_ptr, dist_ptr, part_ptr, g_assign_ptr,
                           g_compact_ptr, g_c_partial_ptr, delta_col_partial_ptr, tau,
                           q // P_SLICES, q % P_SLICES, P, N, W, D, K, SPLIT, P_SLICE,
                           stride_eb, stride_ed, stride_eh, stride_ew,
                           stride_gb, stride_gd, stride_gh, stride_gw,
                           KP, BLOCK_P, BLOCK_D, PRECISION)


def forward(embedding: Tensor, centers: Tensor, log_tau: Tensor):
    """Launch the forward; returns (central, assign, compact, dist)."""
    B, D, H, W = embedding.shape
    K = centers.shape[0]
    N, P = H * W, B * H * W
    p = plan(B, D, N, K)
    KP = p["KP"]
    f32 = dict(device=embedding.device, dtype=torch.float32)
    shapes = workspace(B, D, N, K)["forward"]
    central = torch.empty((B, D, H, W), **f32)
    assign = torch.empty((B, K, H, W), **f32)
    compact = torch.empty((B, H, W), **f32)
    dist, part, e2_part, c2_part = (torch.empty(shapes[name], **f32)
                                    for name in ("dist", "part", "e2_part", "c2_part"))
    common = dict(KP=KP, BLOCK_P=p["BLOCK_P"], BLOCK_D=p["BLOCK_D"], PRECISION=PRECISION)
    launch(_cram_dots_kernel, (p["rows"], p["SPLIT"]), dict(
        x_ptr=embedding, c_ptr=centers, part_ptr=part, x2_part_ptr=e2_part,
        c2_part_ptr=c2_part, P=P, N=N, W=W, D=D, K=K, D_SLICE=p["D_SLICE"],
        **strides(embedding, "stride_xb stride_xd stride_xh stride_xw"),
        **strides(centers, "stride_ck stride_cd"), SQUARES=True, **common))
    launch(_cram_fwd_kernel, (p["rows"], p["D_BLOCKS"]), dict(
        c_ptr=centers, log_tau_ptr=log_tau, part_ptr=part, e2_part_ptr=e2_part,
        c2_part_ptr=c2_part, central_ptr=central, assign_ptr=assign, compact_ptr=compact,
        dist_ptr=dist, P=P, N=N, D=D, K=K, SPLIT=p["SPLIT"], D_CHUNK=p["D_CHUNK"],
        **strides(centers, "stride_ck stride_cd"), **common))
    return central, assign, compact, dist


def backward(embedding: Tensor, centers: Tensor, log_tau: Tensor, assign: Tensor, dist: Tensor,
             grad_central: Tensor, grad_assign: Tensor, grad_compact: Tensor):
    """Launch the backward; returns (grad_embedding, grad_centers, grad_log_tau)."""
    B, D, H, W = embedding.shape
    K = centers.shape[0]
    N, P = H * W, B * H * W
    p = plan(B, D, N, K)
    KP = p["KP"]
    f32 = dict(device=embedding.device, dtype=torch.float32)
    assign = assign.contiguous()
    grad_embedding = torch.empty_like(embedding)
    shapes = workspace(B, D, N, K)["backward"]
    part, g_log_tau_partial, g_c_partial, delta_col_partial = (
        torch.empty(shapes[name], **f32) for name in (
            "part", "g_log_tau_partial", "g_c_partial", "delta_col_partial"))
    common = dict(KP=KP, BLOCK_P=p["BLOCK_P"], BLOCK_D=p["BLOCK_D"], PRECISION=PRECISION)
    launch(_cram_dots_kernel, (p["rows"], p["SPLIT"]), dict(
        x_ptr=grad_central, c_ptr=centers, part_ptr=part,
        # SQUARES=False: the squares' buffers are not written.
        x2_part_ptr=part, c2_part_ptr=part, P=P, N=N, W=W, D=D, K=K, D_SLICE=p["D_SLICE"],
        **strides(grad_central, "stride_xb stride_xd stride_xh stride_xw"),
        **strides(centers, "stride_ck stride_cd"), SQUARES=False, **common))
    row_programs = p["rows"] * p["D_BLOCKS"]
    launch(_cram_bwd_kernel, (row_programs + p["CENTRE_BLOCKS"] * p["P_SLICES"],), dict(
        e_ptr=embedding, c_ptr=centers, log_tau_ptr=log_tau, assign_ptr=assign,
        dist_ptr=dist, part_ptr=part, g_assign_ptr=grad_assign.contiguous(),
        g_compact_ptr=grad_compact.contiguous(), g_central_ptr=grad_central,
        g_e_ptr=grad_embedding, g_log_tau_partial_ptr=g_log_tau_partial,
        g_c_partial_ptr=g_c_partial, delta_col_partial_ptr=delta_col_partial,
        P=P, N=N, W=W, D=D, K=K, SPLIT=p["SPLIT"], D_CHUNK=p["D_CHUNK"],
        D_BLOCKS=p["D_BLOCKS"], P_SLICE=p["P_SLICE"], P_SLICES=p["P_SLICES"],
        ROW_PROGRAMS=row_programs,
        **strides(embedding, "stride_eb stride_ed stride_eh stride_ew"),
        **strides(centers, "stride_ck stride_cd"),
        **strides(grad_central, "stride_gb stride_gd stride_gh stride_gw"),
        **strides(grad_embedding, "stride_geb stride_ged stride_geh stride_gew"), **common))
    # Sums over slices in a fixed order: deterministic. dL/dc_k gets 2 c_k sum_i delta_ik.
    delta_col = delta_col_partial.sum(dim=0)[:K]
    grad_centers = (g_c_partial.sum(dim=0)[:K]
                    + 2.0 * delta_col[:, None] * centers.to(torch.float32)).to(centers.dtype)
    grad_log_tau = g_log_tau_partial.sum().reshape(log_tau.shape).to(log_tau.dtype)
    return grad_embedding, grad_centers, grad_log_tau


INTERPRETED = not isinstance(_cram_fwd_kernel, triton.runtime.JITFunction)
