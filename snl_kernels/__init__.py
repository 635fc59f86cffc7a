"""snl-kernels: fused kernels for SNL (Structural Teacher-Student Normality Learning).

Public ops, each with a ``backend=`` argument ("torch", "triton", "cuda" or None for
automatic; see :mod:`snl_kernels.dispatch`):

- :func:`cosine_distances`, :func:`spatial_channel_loss` (DESIGN §2.1)
- :func:`intra_affinity_loss` (§2.2), :func:`inter_affinity_loss` (§2.3)
- :func:`cram` (§2.4)
- :func:`anomaly_map` (§2.5)
- :func:`snl_distillation_loss`: every distillation term over the levels in one call, sharing
  the norms and pooled levels the separate ops recompute (:mod:`snl_kernels.distillation`)

:mod:`snl_kernels.reference` holds the plain-PyTorch specification of every op.
``python -m snl_kernels`` prints what can run on this machine.
"""

from . import distillation_op as _distillation_op  # noqa: F401  (registers its ops)
from . import reference
from ._version import __version__
from .anomaly_map import anomaly_map
from .cosine_distances import cosine_distances, spatial_channel_loss
from .cram import cram
from .dispatch import BACKENDS, BackendUnavailableError, availability
from .distillation import snl_distillation_loss
from .inter_affinity_loss import inter_affinity_loss
from .intra_affinity_loss import intra_affinity_loss
from .reference import AnomalyMap, CosineDistances, CramOutput, SpatialChannelLoss

__all__ = [
    "BACKENDS",
    "AnomalyMap",
    "BackendUnavailableError",
    "CosineDistances",
    "CramOutput",
    "SpatialChannelLoss",
    "__version__",
    "anomaly_map",
    "availability",
    "cosine_distances",
    "cram",
    "inter_affinity_loss",
    "intra_affinity_loss",
    "reference",
    "snl_distillation_loss",
    "spatial_channel_loss",
]
