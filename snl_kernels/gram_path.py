"""The intra-affinity l2 loss in PyTorch through C x C Grams (DESIGN §2.2, Gram form).

Automatic mode runs this instead of the reference where no kernel backend can (CPU tensors,
or a GPU without kernels) and the Gram form applies: distance "l2", fewer channels than
pixels, inputs not float64. The reference (``snl_kernels.reference``) stays the plain
specification: it forms both N x N affinity matrices, 4 N^2 C operations per sample, where
this path forms one (3C x N)(N x 3C) product, 18 C^2 N (EfficientNet-Lite0 level 1 at
128 px: N = 1024, C = 24, about 10x fewer, and no 4 MB matrix per sample). Asking for
``backend="torch"`` (or ``SNL_BACKEND=torch``) always gets the reference; tests hold this
path to it.

Math, per sample, with ``X = F / max(|F|_C, eps)`` per pixel (C x N), ``D = X_S - X_T``
formed from the normalised columns and ``G_ab = X_a X_b^T`` (C x C)::

    ||A_T - A_S||_F^2 = <G_SS + G_TT, G_DD> + 2 <G_SD, G_DT>

The difference D keeps fp32 rounding proportional to how far the student is from the
teacher, as in the kernels. Autograd differentiates through the Grams (and through the
clamped norms as the reference does: a clamped norm is a constant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import EPS, compute_dtype, full_precision


def applies(teacher: Tensor, distance: str) -> bool:
    """Whether automatic mode takes this path for these inputs (see the module docstring)."""
    _, c, h, w = teacher.shape
    return distance == "l2" and c < h * w and teacher.dtype != torch.float64


@full_precision
def intra_affinity_l2(teacher: Tensor, student: Tensor) -> Tensor:
    """``mean (A_T - A_S)^2`` over (b, i, j), ``A = X^T X``, without N x N matrices.

    Args:
        teacher: (B, C, H, W) teacher features (checked by the caller).
        student: (B, C, H, W) student features.

    Returns:
        0-dim float32 loss (float64 for float64 inputs).
    """
    dt = compute_dtype(teacher)

    def normalised(f: Tensor) -> Tensor:
        x = f.to(dt).flatten(2)
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(EPS)

    x_t, x_s = normalised(teacher), normalised(student)
    d = x_s - x_t
    stacked = torch.cat([x_s, x_t, d], dim=1)  # (B, 3C, N): one product gives every Gram
    grams = stacked @ stacked.transpose(1, 2)
    c = teacher.shape[1]
    g_ss, g_tt, g_dd = grams[:, :c, :c], grams[:, c:2 * c, c:2 * c], grams[:, 2 * c:, 2 * c:]
    g_sd, g_dt = grams[:, :c, 2 * c:], grams[:, 2 * c:, c:2 * c]
    total = ((g_ss + g_tt) * g_dd).sum() + 2 * (g_sd * g_dt).sum()
    b, n = teacher.shape[0], teacher.shape[2] * teacher.shape[3]
    return total / (b * n * n)
