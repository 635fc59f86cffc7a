"""snl: the SNL anomaly-detection model on top of snl_kernels' ops.

``model = snl.SNL(backbone="wide_resnet50_2", fused=True)``; ``model.loss(images)`` for
training, ``model.predict(images)`` for scores and maps. ``fused=False`` runs every op on
the plain-PyTorch reference of :mod:`snl_kernels.reference`. timm (the teacher backbones)
is imported only when a model is built.
"""

from .config import Architecture, Normalization, architecture, normalization
from .cram import CRAM
from .model import SNL, Features
from .weights import WeightsUnavailableError

__all__ = [
    "CRAM",
    "SNL",
    "Architecture",
    "Features",
    "Normalization",
    "WeightsUnavailableError",
    "architecture",
    "normalization",
]
