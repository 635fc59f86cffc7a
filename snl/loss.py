"""SNL's and RD4AD's training losses (docs/model.md §1), from teacher and student levels.

SNL: ``L = w_rd sum_k L_rd^k + w_ch sum_k L_ch^k + w_sp sum_k L_sp^k
+ w_intra sum_k L_intra^k + w_inter sum_{(1,2),(2,3)} L_inter + w_c L_c`` with
``L_rd = mean(sample)``, ``L_ch = mean(pixel)``, ``L_sp = mean(channel)`` (DESIGN §2.1), the
affinity losses of §2.2 and §2.3 and CRAM's compactness ``L_c`` (§2.4: ``mean(compact)``,
divided by the embedding width D with ``compact_norm="dim"``, the default). Defaults
(docs/model.md §1, chosen by the ablation there): ``w_rd = 1``,
``w_ch = w_sp = w_intra = w_inter = 0.01``, ``w_c = 0.1``. A weight of 0 switches its term
off: it is neither computed nor reported.
RD4AD: ``L = sum_k L_rd^k``, the flattened per-sample cosine distance.

The dicts hold each term unweighted (0-dim float32 tensors) and ``total``, the weighted sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import snl_kernels

PAIRS = ((0, 1), (1, 2))
#: How CRAM's compactness enters the loss: "sum" is ``mean_i sum_k a_ik |e_i - c_k|^2`` as the
#: op returns it (it grows with the embedding width D), "dim" divides it by D.
COMPACT_NORMS = ("sum", "dim")
DEFAULT_COMPACT_NORM = "dim"
#: CRAM's initial temperature: the embedding width D ("dim") or its square root ("sqrt").
CRAM_TAUS = ("dim", "sqrt")
DEFAULT_CRAM_TAU = "dim"


@dataclass(frozen=True)
class LossWeights:
    """Weights of SNL's loss terms (0 switches a term off); the defaults are docs/model.md §1's."""

    w_ch: float = 0.01
    w_sp: float = 0.01
    w_intra: float = 0.01
    w_inter: float = 0.01
    w_c: float = 0.1
    w_rd: float = 1.0


def common_dtype(teachers: Sequence[Tensor], students: Sequence[Tensor]):
    """Cast each teacher/student pair to their common dtype (they differ under autocast)."""
    pairs = []
    for t, s in zip(teachers, students, strict=True):
        dtype = torch.promote_types(t.dtype, s.dtype)
        pairs.append((t.to(dtype), s.to(dtype)))
    return [t for t, _ in pairs], [s for _, s in pairs]


def snl_loss(teachers: Sequence[Tensor], students: Sequence[Tensor], compact: Tensor | None,
             weights: LossWeights, intra_distance: str = "l2", inter_distance: str = "l2",
             backend: str | None = None) -> dict[str, Tensor]:
    """SNL's loss terms and their weighted ``total``.

    Args:
        teachers: three (B, C_k, H_k, W_k) teacher levels, fine to coarse.
        students: the student's levels, same shapes.
        compact: (B, h, w) CRAM compactness, or None when there is no CRAM.
        weights: the term weights.
        intra_distance: "l2" or "l1" for the intra-affinity loss.
        inter_distance: "l2" or "l1" for the inter-affinity loss.
        backend: the ``backend=`` of every op (:func:`snl.backend.op_backend`).

    Returns:
        A dict with ``rd``, ``channel``, ``spatial``, ``intra``, ``inter``, ``compact``
        (those whose weight is not 0) and ``total``. ``compact`` is the value given (the
        caller normalises it). The keys name the terms, as the weights do:
        ``channel`` (L_ch) compares the C-vector of every pixel, so it holds the mean of the
        per-*pixel* distances; ``spatial`` (L_sp) compares the H x W map of every channel,
        so it holds the mean of the per-*channel* distances.
    """
    w = weights
    weight_of = {"rd": w.w_rd, "channel": w.w_ch, "spatial": w.w_sp, "intra": w.w_intra,
                 "inter": w.w_inter}
    asked = [term for term, weight in weight_of.items() if weight]
    terms: dict[str, Tensor] = {}
    weighted: list[Tensor] = []
    if asked:
        # One call for every distillation term (the inter term pairs levels (0, 1), (1, 2)).
        terms.update(snl_kernels.snl_distillation_loss(
            teachers, students, asked, intra_distance, inter_distance, backend=backend))
        weighted += [weight_of[term] * terms[term] for term in asked]
    if w.w_c and compact is not None:
        terms["compact"] = compact.mean()
        weighted.append(w.w_c * terms["compact"])
    if not weighted:
        raise ValueError("every loss weight is 0: switch at least one term on")
    terms["total"] = torch.stack(weighted).sum()
    return terms


def rd_loss(teachers: Sequence[Tensor], students: Sequence[Tensor],
            backend: str | None = None) -> dict[str, Tensor]:
    """RD4AD's loss ``sum_k mean(sample_k)`` as ``{"rd": ..., "total": ...}``."""
    rd = snl_kernels.spatial_channel_loss(teachers, students, backend=backend).sample_mean
    return {"rd": rd, "total": rd}
