"""CRAM, central residual aggregation (DESIGN §2.4), as a module of the student.

The embedding ``e_i`` (D channels at each of the h x w positions) is softly assigned to K
learned centres ``c_k`` at the learned temperature ``tau = exp(log_tau)``:
``a_ik = softmax_k(-|e_i - c_k|^2 / tau)``. The central part ``mu_i = sum_k a_ik c_k`` is
what normal images share; the residual ``rho_i = e_i - mu_i`` what is particular to one.
The module returns ``z = mu + phi(rho)``, ``phi`` = 1x1 conv + BatchNorm, so the decoder
sees the centre plus a learned, re-normalised residual, and the compactness loss
``L_c = mean_i sum_k a_ik |e_i - c_k|^2`` pulls embeddings and centres together.

The soft assignment, central part and compactness come from snl_kernels' ``cram`` op
(kernels with ``fused=True``, the reference otherwise; see :mod:`snl.backend`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import snl_kernels
from snl_kernels import CramOutput

from .backend import full_precision, op_backend


class CRAM(nn.Module):
    """Central residual aggregation over (B, D, h, w) embeddings.

    Args:
        dim: D, channels of the embedding.
        num_centers: K, number of learned centres.
        tau: initial temperature; None means D, which keeps the first assignments soft
            (squared distances between D-vectors grow like D).
        fused: use snl_kernels' ``cram`` (True) or the reference (False).
    """

    def __init__(self, dim: int, num_centers: int = 16, tau: float | None = None,
                 fused: bool = True, residual_ratio: int = 1):
        super().__init__()
        if not isinstance(num_centers, int) or isinstance(num_centers, bool) or num_centers < 1:
            raise ValueError(f"num_centers must be a positive int, got {num_centers!r}")
        if (not isinstance(residual_ratio, int) or isinstance(residual_ratio, bool)
                or not 1 <= residual_ratio <= dim):
            raise ValueError(f"residual_ratio must be an int from 1 to the embedding width {dim}, "
                             f"got {residual_ratio!r}")
        if tau is not None and not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive number or None, got {tau!r}")
        self.fused = fused
        self.centers = nn.Parameter(torch.randn(num_centers, dim))
        self.log_tau = nn.Parameter(torch.tensor(math.log(dim if tau is None else tau)))
        if residual_ratio == 1:
            self.phi = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        else:
            narrow = max(1, dim // residual_ratio)
            self.phi = nn.Sequential(nn.Conv2d(dim, narrow, 1, bias=False), nn.BatchNorm2d(narrow),
                                     nn.ReLU(inplace=True), nn.Conv2d(narrow, dim, 1, bias=False),
                                     nn.BatchNorm2d(dim))
        for m in self.phi:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="linear")

    def forward(self, embedding: Tensor) -> tuple[Tensor, CramOutput]:
        """``z = mu + phi(e - mu)`` and the op's outputs.

        Args:
            embedding: (B, D, h, w).

        Returns:
            ``z`` (B, D, h, w), and ``CramOutput(central (B, D, h, w), assign (B, K, h, w),
            compact (B, h, w))``; ``L_c`` is ``compact.mean()``.
        """
        with full_precision(embedding.device.type):
            out = snl_kernels.cram(embedding, self.centers, self.log_tau,
                                   backend=op_backend(self.fused))
        residual = embedding - out.central
        return out.central + self.phi(residual), out
