"""The intra-affinity l2 loss in PyTorch through C x C Grams (DESIGN §2.2, Gram form).

Automatic mode runs this instead of the reference where no kernel backend can (CPU tensors,
or a GPU without kernels) and the Gram form applies: distance "l2", fewer channels than
pixels, inputs not float64. The reference (``snl_kernels.reference``) stays the plain
specification: it forms both N x N affinity matrices, 4 N^2 C operations per sample, where
this path forms one (2C x N)(N x 2C) product, 8 C^2 N (EfficientNet-Lite0 level 1 at
128 px: N = 1024, C = 24, about 10x fewer, and no 4 MB matrix per sample). Asking for
``backend="torch"`` (or ``SNL_BACKEND=torch``) always gets the reference; tests hold this
path to it.

Math, per sample, with ``X = F / max(|F|_C, eps)`` per pixel (C x N), ``E = X_S + X_T``,
``D = X_S - X_T`` formed from the normalised columns and ``G_ab = a b^T`` (C x C)::

    A_S - A_T = (E^T D + D^T E) / 2
    ||A_T - A_S||_F^2 = (<G_EE, G_DD> + <G_ED, G_DE^T>) / 2

one (2C x N)(N x 2C) product, 8 C^2 N. The backward (written out, not taped: autograd through
the Grams would cost 4x the forward) is two C x 2C by 2C x N products, 4 C^2 N each::

    dL/dX_S ~ (G_DD + G_ED) E + (G_DE + G_EE) D,   dL/dX_T ~ (G_DD - G_ED) E + (G_DE - G_EE) D

D keeps fp32 rounding proportional to how far the student is from the teacher, as in the
kernels: every term of the loss and of the gradients carries a factor from D. Autograd
differentiates the normalisation (through the clamped norms as the reference does: a
clamped norm is a constant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import clamped_norm, compute_dtype, full_precision


def applies(teacher: Tensor, distance: str) -> bool:
    """Whether automatic mode takes this path for these inputs (see the module docstring)."""
    _, c, h, w = teacher.shape
    return distance == "l2" and c < h * w and teacher.dtype != torch.float64


class _GramL2(torch.autograd.Function):
    """``sum_b ||A_T - A_S||_F^2`` from the normalised (B, C, N) ``x_s`` and ``x_t``."""

    @staticmethod
    def forward(ctx, x_s: Tensor, x_t: Tensor) -> Tensor:
        c = x_s.shape[1]
        ed = torch.cat([x_s + x_t, x_s - x_t], dim=1)  # (B, 2C, N): [E; D]
        g = ed @ ed.transpose(1, 2)
        g_ee, g_ed, g_dd = g[:, :c, :c], g[:, :c, c:], g[:, c:, c:]
        total = 0.5 * ((g_ee * g_dd).sum() + (g_ed * g_ed.transpose(1, 2)).sum())
        ctx.save_for_backward(ed, g)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        ed, g = ctx.saved_tensors
        c = ed.shape[1] // 2
        g_ee, g_ed, g_de, g_dd = g[:, :c, :c], g[:, :c, c:], g[:, c:, :c], g[:, c:, c:]
        grads = []
        for sign, needed in ((1, ctx.needs_input_grad[0]), (-1, ctx.needs_input_grad[1])):
            if not needed:
                grads.append(None)
                continue
            # [coefficient of E, coefficient of D] @ [E; D]
            k = torch.cat([g_dd + sign * g_ed, g_de + sign * g_ee], dim=2)
            grads.append((k @ ed) * grad)
        return grads[0], grads[1]


def gram_total(x_s: Tensor, x_t: Tensor) -> Tensor:
    """``sum_b ||A_T - A_S||_F^2`` from the normalised (B, C, N) student and teacher."""
    return _GramL2.apply(x_s, x_t)


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
        return x / clamped_norm(x, 1, keepdim=True)

    total = gram_total(normalised(student), normalised(teacher))
    b, n = teacher.shape[0], teacher.shape[2] * teacher.shape[3]
    return total / (b * n * n)
