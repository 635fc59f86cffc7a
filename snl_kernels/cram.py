"""Central residual aggregation (DESIGN §2.4): soft assignment of positions to centres.

Forward. For each position i of the embedding E (B, D, h, w), e_i in R^D, centres C (K, D)
and temperature ``tau = exp(log_tau)``:

    d_ik = |e_i|^2 - 2 e_i.c_k + |c_k|^2        (one (B N, D) x (D, K) product)
    a_ik = softmax_k(-d_ik / tau)                (row max subtracted: stable)
    mu_i = sum_k a_ik c_k,  compact_i = sum_k a_ik d_ik

Outputs ``central`` = mu (B, D, h, w), ``assign`` = a (B, K, h, w), ``compact`` (B, h, w).
The kernels also return the distances d (B N, K), saved for backward with ``assign``.

Backward, with upstream gradients G_mu, G_a, G_c:

    dL/da_ik  = G_a,ik + G_c,i d_ik + G_mu,i . c_k
    dL/dl_ik  = a_ik (dL/da_ik - sum_j a_ij dL/da_ij)          (l = -d / tau)
    delta_ik  = dL/dd_ik = G_c,i a_ik - dL/dl_ik / tau
    dL/de_i   = 2 e_i sum_k delta_ik - 2 sum_k delta_ik c_k
    dL/dc_k   = sum_i a_ik G_mu,i - 2 sum_i delta_ik e_i + 2 c_k sum_i delta_ik
    dL/dlog_tau = sum_ik dL/dl_ik d_ik / tau

so backward is one more read of E and G_mu; the (B N, K) quantities stay on chip.

Backends: ``torch`` (reference), ``triton`` (``snl_kernels/_triton/cram.py``) and ``cuda``
(cuBLAS products with row kernels between them: ``csrc/cram_host.h``, ``csrc/cram.cu``;
K <= 256). Both kernel backends are ``torch.library`` ops with fake
implementations and registered autograd.
"""

import torch
from torch import Tensor

from . import _triton, checks, dispatch, reference
from ._registration import register_kernel_ops
from .reference import CramOutput

OP = "cram"
IMPLEMENTED: tuple[str, ...] = ("triton", "cuda")
# The CUDA kernels keep a position's K distances in registers: at most 256 centres.
CUDA_MAX_K = 256

_FWD_SCHEMA = (
    "(Tensor embedding, Tensor centers, Tensor log_tau) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor embedding, Tensor centers, Tensor log_tau, Tensor assign, Tensor dist, "
    "Tensor grad_central, Tensor grad_assign, Tensor grad_compact) -> (Tensor, Tensor, Tensor)"
)


def _kernels():
    return _triton.kernels("cram")


def _triton_fwd_body(embedding, centers, log_tau):
    return _kernels().forward(embedding, centers, log_tau)


def _triton_bwd_body(embedding, centers, log_tau, assign, dist, grad_central, grad_assign,
                     grad_compact):
    return _kernels().backward(embedding, centers, log_tau, assign, dist, grad_central,
                               grad_assign, grad_compact)


_triton_fwd = torch.library.custom_op("snl_triton::cram_fwd", _triton_fwd_body,
                                      mutates_args=(), schema=_FWD_SCHEMA)
_triton_bwd = torch.library.custom_op("snl_triton::cram_bwd", _triton_bwd_body,
                                      mutates_args=(), schema=_BWD_SCHEMA)


def _fake_fwd(embedding, centers, log_tau):
    B, D, H, W = embedding.shape
    K = centers.shape[0]
    f32 = dict(dtype=torch.float32)
    return (embedding.new_empty((B, D, H, W), **f32), embedding.new_empty((B, K, H, W), **f32),
            embedding.new_empty((B, H, W), **f32), embedding.new_empty((B * H * W, K), **f32))


def _fake_bwd(embedding, centers, log_tau, assign, dist, grad_central, grad_assign,
              grad_compact):
    return torch.empty_like(embedding), torch.empty_like(centers), torch.empty_like(log_tau)


def _setup_context(ctx, inputs, output):
    embedding, centers, log_tau = inputs
    ctx.save_for_backward(embedding, centers, log_tau, output[1], output[3])


def _make_backward(bwd_op):
    def backward(ctx, grad_central, grad_assign, grad_compact, _grad_dist):
        embedding, centers, log_tau, assign, dist = ctx.saved_tensors

        def upstream(g, like):
            return torch.zeros_like(like) if g is None else g.to(torch.float32)

        grads = bwd_op(
            embedding, centers, log_tau, assign, dist,
            upstream(grad_central, embedding.to(torch.float32)), upstream(grad_assign, assign),
            upstream(grad_compact, dist[:, 0].reshape(assign.shape[0], *assign.shape[2:])),
        )
        return tuple(g if need else None
                     for g, need in zip(grads, ctx.needs_input_grad, strict=True))

    return backward


_FORWARD_OPS = register_kernel_ops("cram_fwd", "cram_bwd", _triton_bwd, _fake_fwd, _fake_bwd,
                                   _make_backward, _setup_context,
                                   (_triton_fwd_body, _triton_bwd_body), differentiable=3)


def cram(embedding: Tensor, centers: Tensor, log_tau: Tensor | float,
         backend: str | None = None) -> CramOutput:
    """Soft-assign each position of ``embedding`` to ``centers`` at temperature exp(log_tau).

    Args:
        embedding: (B, D, h, w) bottleneck embedding, float16/bfloat16/float32/float64.
        centers: (K, D) centres.
        log_tau: log temperature, a float or a one-element tensor (may require grad).
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        ``CramOutput(central (B, D, h, w), assign (B, K, h, w), compact (B, h, w))``, float32
        (float64 for float64 inputs, which only the reference takes).

    Raises:
        TypeError, ValueError: bad embedding, centres or log_tau (the message names which).
        BackendUnavailableError: the requested backend cannot run here (with the reasons).
    """
    checks.check_cram(OP, embedding, centers, log_tau)
    why_not = None
    if torch.float64 in (embedding.dtype, centers.dtype):
        why_not = "float64 inputs run on the reference only"
    # Automatic mode leaves K > CUDA_MAX_K to Triton; backend="cuda" then raises the op's error.
    prefer = ("cuda", "triton") if centers.shape[0] <= CUDA_MAX_K else ("triton",)
    chosen = dispatch.select_backend(OP, backend, (embedding, centers), IMPLEMENTED,
                                     prefer=prefer, why_not=why_not)
    if chosen == "torch":
        return reference.cram(embedding, centers, log_tau)
    if isinstance(log_tau, Tensor):
        tau_t = log_tau.to(device=embedding.device, dtype=torch.float32).reshape(())
    else:
        tau_t = torch.tensor(float(log_tau), device=embedding.device, dtype=torch.float32)
    central, assign, compact = _FORWARD_OPS[chosen].leading(embedding, centers, tau_t)
    return CramOutput(central, assign, compact)
