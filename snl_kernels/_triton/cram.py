"""Triton kernels of ``cram``; the math is in ``snl_kernels/cram.py``.

Memory plan. Positions p = b * N + n are cut into blocks of BLOCK_P; one program owns a
block and all K centres (padded to a power of two, KP >= 16, for ``tl.dot``). Forward reads
its embedding rows once to form ``e.c_k`` and ``|e|^2`` over D in chunks, keeps the
(BLOCK_P, KP) distances, logits and softmax on chip, then streams the centres again to
write ``mu = a @ C``. Backward reads the embedding and the upstream central gradient once
more; the centre gradient is summed per program into a (programs, KP, D) buffer and then
over programs in a fixed order (no atomics: same bits on every run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import strides

# The same blocks in both configurations (see ``gpu_config`` in ``__init__.py``).
BLOCK_P = 32
BLOCK_D = 64


def _blocks(kp: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) for KP padded centres: the (KP, BLOCK_D) centre chunk and the
    (BLOCK_P, KP) tiles shrink as KP grows (at KP = 256 the default tiles took 75-80 s per
    kernel to compile for sm_90 and would spill registers)."""
    if kp <= 64:
        return BLOCK_P, BLOCK_D
    return (BLOCK_P if kp <= 128 else 16), max(16, 4096 // kp)


@triton.jit
def _row_offsets(offs_p, N, W, stride_b, stride_h, stride_w):
    b = (offs_p // N).to(tl.int64)
    n = offs_p % N
    return b * stride_b + (n // W) * stride_h + (n % W) * stride_w


@triton.jit
def _positions(P, N, BLOCK_P: tl.constexpr):
    """This program's BLOCK_P positions p = b N + n: offsets, mask, sample b and pixel n."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return offs_p, offs_p < P, (offs_p // N).to(tl.int64), offs_p % N


@triton.jit
def _by_channel(b, offs_c, n, C, N):
    """Offsets of [b, c, n] in a contiguous (B, C, N) tensor: (positions, channels)."""
    return (b * C)[:, None] * N + offs_c[None, :] * N + n[:, None]


@triton.jit
def _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd):
    """fp32 (KP, BLOCK_D) chunk of the centres."""
    return tl.load(c_ptr + offs_k[:, None] * stride_ck + offs_d[None, :] * stride_cd,
                   mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _cram_fwd_kernel(
    e_ptr, c_ptr, log_tau_ptr, central_ptr, assign_ptr, compact_ptr, dist_ptr,
    P, N, W, D, K,
    stride_eb, stride_ed, stride_eh, stride_ew,
    stride_ck, stride_cd,
    KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_p, mask_p, b, n = _positions(P, N, BLOCK_P)
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    e_row = e_ptr + _row_offsets(offs_p, N, W, stride_eb, stride_eh, stride_ew)
    tau = tl.exp(tl.load(log_tau_ptr).to(tl.float32))
    ec = tl.zeros([BLOCK_P, KP], dtype=tl.float32)
    e2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    c2 = tl.zeros([KP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        e = tl.load(e_row[:, None] + offs_d[None, :] * stride_ed,
                    mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        c = _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd)
        # ieee: exact fp32 products; tf32 would round the distances to 10 bits.
        ec += tl.dot(e, tl.trans(c), input_precision="ieee")
        e2 += tl.sum(e * e, axis=1)
        c2 += tl.sum(c * c, axis=1)
    dist = e2[:, None] - 2.0 * ec + c2[None, :]
    logits = tl.where(mask_k[None, :], -dist / tau, float("-inf"))
    # Row max subtracted first: large distances and tiny temperatures stay finite.
    logits = logits - tl.max(logits, axis=1)[:, None]
    expl = tl.exp(logits)
    a = expl / tl.sum(expl, axis=1)[:, None]
    compact = tl.sum(tl.where(mask_k[None, :], a * dist, 0.0), axis=1)
    mask_pk = mask_p[:, None] & mask_k[None, :]
    tl.store(assign_ptr + _by_channel(b, offs_k, n, K, N), a, mask=mask_pk)
    tl.store(dist_ptr + offs_p[:, None].to(tl.int64) * K + offs_k[None, :], dist, mask=mask_pk)
    tl.store(compact_ptr + offs_p, compact, mask=mask_p)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        c = _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd)
        mu = tl.dot(a, c, input_precision="ieee")
        tl.store(central_ptr + _by_channel(b, offs_d, n, D, N), mu,
                 mask=mask_p[:, None] & mask_d[None, :])


@triton.jit
def _cram_bwd_kernel(
    e_ptr, c_ptr, log_tau_ptr, assign_ptr, dist_ptr,
    g_central_ptr, g_assign_ptr, g_compact_ptr,
    g_e_ptr, g_c_partial_ptr, g_log_tau_partial_ptr,
    P, N, W, D, K,
    stride_eb, stride_ed, stride_eh, stride_ew,
    stride_ck, stride_cd,
    stride_gb, stride_gd, stride_gh, stride_gw,
    stride_geb, stride_ged, stride_geh, stride_gew,
    KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_p, mask_p, b, n = _positions(P, N, BLOCK_P)
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    mask_pk = mask_p[:, None] & mask_k[None, :]
    tau = tl.exp(tl.load(log_tau_ptr).to(tl.float32))
    pk = _by_channel(b, offs_k, n, K, N)
    a = tl.load(assign_ptr + pk, mask=mask_pk, other=0.0)
    dist = tl.load(dist_ptr + offs_p[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask_pk,
                   other=0.0)
    g_compact = tl.load(g_compact_ptr + offs_p, mask=mask_p, other=0.0)
    # dL/da from the assignment itself, the compactness term, and mu = a @ C.
    g_a = tl.load(g_assign_ptr + pk, mask=mask_pk, other=0.0) + g_compact[:, None] * dist
    g_row = g_central_ptr + _row_offsets(offs_p, N, W, stride_gb, stride_gh, stride_gw)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        gm = tl.load(g_row[:, None] + offs_d[None, :] * stride_gd,
                     mask=mask_p[:, None] & mask_d[None, :], other=0.0)
        c = _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd)
        g_a += tl.dot(gm, tl.trans(c), input_precision="ieee")
    # Softmax backward, then logits = -dist / tau.
    g_logit = a * (g_a - tl.sum(a * g_a, axis=1)[:, None])
    delta = tl.where(mask_pk, g_compact[:, None] * a - g_logit / tau, 0.0)
    # sum_k dL/dl_ik = 0, so each row's distances may be taken from their minimum: the same
    # value with far less cancellation when the distances are large and close together.
    d_min = tl.min(tl.where(mask_pk, dist, float("inf")), axis=1)
    d_rel = tl.where(mask_pk, dist - d_min[:, None], 0.0)
    tl.store(g_log_tau_partial_ptr + pid,
             tl.sum(tl.sum(g_logit * d_rel, axis=1), axis=0) / tau)
    delta_row = tl.sum(delta, axis=1)
    delta_col = tl.sum(delta, axis=0)
    e_row = e_ptr + _row_offsets(offs_p, N, W, stride_eb, stride_eh, stride_ew)
    ge_row = g_e_ptr + _row_offsets(offs_p, N, W, stride_geb, stride_geh, stride_gew)
    part = g_c_partial_ptr + pid.to(tl.int64) * KP * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_pd = mask_p[:, None] & mask_d[None, :]
        e = tl.load(e_row[:, None] + offs_d[None, :] * stride_ed, mask=mask_pd,
                    other=0.0).to(tl.float32)
        gm = tl.load(g_row[:, None] + offs_d[None, :] * stride_gd, mask=mask_pd, other=0.0)
        c = _centres(c_ptr, offs_k, mask_k, offs_d, mask_d, stride_ck, stride_cd)
        # d = |e|^2 - 2 e.c + |c|^2: dd/de = 2 (e - c), dd/dc = 2 (c - e).
        g_e = 2.0 * e * delta_row[:, None] - 2.0 * tl.dot(delta, c, input_precision="ieee")
        tl.store(ge_row[:, None] + offs_d[None, :] * stride_ged,
                 g_e.to(g_e_ptr.dtype.element_ty), mask=mask_pd)
        g_c = (tl.dot(tl.trans(a), gm, input_precision="ieee")
               - 2.0 * tl.dot(tl.trans(delta), e, input_precision="ieee")
               + 2.0 * delta_col[:, None] * c)
        tl.store(part + offs_k[:, None] * D + offs_d[None, :], g_c, mask=mask_d[None, :])


def _pad_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def forward(embedding: Tensor, centers: Tensor, log_tau: Tensor):
    """Launch the forward; returns (central, assign, compact, dist)."""
    B, D, H, W = embedding.shape
    K = centers.shape[0]
    N, P = H * W, B * H * W
    f32 = dict(device=embedding.device, dtype=torch.float32)
    central = torch.empty((B, D, H, W), **f32)
    assign = torch.empty((B, K, H, W), **f32)
    compact = torch.empty((B, H, W), **f32)
    dist = torch.empty((P, K), **f32)
    KP = _pad_k(K)
    block_p, block_d = _blocks(KP)
    _cram_fwd_kernel[(triton.cdiv(P, block_p),)](
        e_ptr=embedding, c_ptr=centers, log_tau_ptr=log_tau, central_ptr=central,
        assign_ptr=assign, compact_ptr=compact, dist_ptr=dist, P=P, N=N, W=W, D=D, K=K,
        **strides(embedding, "stride_eb stride_ed stride_eh stride_ew"),
        **strides(centers, "stride_ck stride_cd"),
        KP=KP, BLOCK_P=block_p, BLOCK_D=block_d,
    )
    return central, assign, compact, dist


def backward(embedding: Tensor, centers: Tensor, log_tau: Tensor, assign: Tensor, dist: Tensor,
             grad_central: Tensor, grad_assign: Tensor, grad_compact: Tensor):
    """Launch the backward; returns (grad_embedding, grad_centers, grad_log_tau)."""
    B, D, H, W = embedding.shape
    K = centers.shape[0]
    N, P = H * W, B * H * W
    KP = _pad_k(K)
    block_p, block_d = _blocks(KP)
    programs = triton.cdiv(P, block_p)
    f32 = dict(device=embedding.device, dtype=torch.float32)
    grad_embedding = torch.empty_like(embedding)
    g_c_partial = torch.empty((programs, KP, D), **f32)
    g_log_tau_partial = torch.empty((programs,), **f32)
    _cram_bwd_kernel[(programs,)](
        e_ptr=embedding, c_ptr=centers, log_tau_ptr=log_tau, assign_ptr=assign.contiguous(),
        dist_ptr=dist, g_central_ptr=grad_central, g_assign_ptr=grad_assign.contiguous(),
        g_compact_ptr=grad_compact.contiguous(), g_e_ptr=grad_embedding,
        g_c_partial_ptr=g_c_partial, g_log_tau_partial_ptr=g_log_tau_partial,
        P=P, N=N, W=W, D=D, K=K,
        **strides(embedding, "stride_eb stride_ed stride_eh stride_ew"),
        **strides(centers, "stride_ck stride_cd"),
        **strides(grad_central, "stride_gb stride_gd stride_gh stride_gw"),
        **strides(grad_embedding, "stride_geb stride_ged stride_geh stride_gew"),
        KP=KP, BLOCK_P=block_p, BLOCK_D=block_d,
    )
    # Sums over programs in a fixed order: deterministic.
    grad_centers = g_c_partial[:, :K].sum(dim=0).to(centers.dtype)
    grad_log_tau = g_log_tau_partial.sum().reshape(log_tau.shape).to(log_tau.dtype)
    return grad_embedding, grad_centers, grad_log_tau
