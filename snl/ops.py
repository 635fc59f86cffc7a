"""The one place that picks kernels or reference: ``fused=True`` or ``fused=False``.

``FUSED`` holds the public ops of :mod:`snl_kernels`, called without ``backend=`` so that
``SNL_BACKEND`` and then automatic choice decide per op (CUDA extension, then Triton, on
CUDA tensors; the reference elsewhere). ``REFERENCE`` holds :mod:`snl_kernels.reference`,
the plain-PyTorch specification. Both tables take the same arguments and return the same
types, so the model calls ``op_table(fused).<op>(...)`` and nothing else differs.

With ``SNL_BACKEND=triton`` (or ``cuda``) every fused op is asked for that backend, and an
op that has no such kernel yet raises ``snl_kernels.BackendUnavailableError`` naming it, as
the library does for any explicit request that cannot run; leave ``SNL_BACKEND`` unset (or
``auto``) to get kernels where they exist and the reference elsewhere.

Under ``torch.autocast`` the ops run with autocast switched off (:func:`full_precision`):
they take the low-precision features as they are and accumulate in fp32 themselves, as
SPEC §2 requires; left on, autocast would recast the reference's matmuls, convs and
interpolations to bf16/fp16 (CRAM's ``|e|^2 - 2 e.c + |c|^2`` would cancel in bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

import snl_kernels
from snl_kernels import reference


class Ops(NamedTuple):
    """The ops the model uses, all from one source."""

    spatial_channel_loss: Callable
    intra_affinity_loss: Callable
    inter_affinity_loss: Callable
    cram: Callable
    anomaly_map: Callable


FUSED = Ops(
    spatial_channel_loss=snl_kernels.spatial_channel_loss,
    intra_affinity_loss=snl_kernels.intra_affinity_loss,
    inter_affinity_loss=snl_kernels.inter_affinity_loss,
    cram=snl_kernels.cram,
    anomaly_map=snl_kernels.anomaly_map,
)

REFERENCE = Ops(
    spatial_channel_loss=reference.spatial_channel_loss,
    intra_affinity_loss=reference.intra_affinity_loss,
    inter_affinity_loss=reference.inter_affinity_loss,
    cram=reference.cram,
    anomaly_map=reference.anomaly_map,
)


def op_table(fused: bool) -> Ops:
    """``FUSED`` (snl_kernels, automatic backend) or ``REFERENCE`` (plain PyTorch)."""
    return FUSED if fused else REFERENCE


def full_precision(device_type: str) -> torch.autocast:
    """A context in which autocast is off, for calling the ops on ``device_type`` tensors."""
    return torch.autocast(device_type=device_type, enabled=False)
