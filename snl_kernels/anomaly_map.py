"""Anomaly map (SPEC §2.5): per-level distances, upsampling, sum, blur and image score.

Only the reference backend exists so far; the fused kernels (one read of the features
through precomputed blur-and-upsample matrices) are tracked by the anomaly-map issue.
Explicit ``backend="triton"`` or ``"cuda"`` raises ``BackendUnavailableError`` saying so;
automatic mode uses the reference.
"""

from collections.abc import Sequence

from torch import Tensor

from . import checks, dispatch, reference
from .reference import AnomalyMap

OP = "anomaly_map"
IMPLEMENTED: tuple[str, ...] = ()


def anomaly_map(teachers: Sequence[Tensor], students: Sequence[Tensor],
                size: int | tuple[int, int], sigma: float = 4.0, mode: str = "add",
                backend: str | None = None) -> AnomalyMap:
    """Anomaly maps (B, 1, H, W) and image scores (B,) from per-level features.

    Args:
        teachers: per-level (B, C_k, H_k, W_k) teacher features.
        students: per-level student features matching ``teachers``.
        size: output size, an int or (H, W).
        sigma: Gaussian blur sigma in output pixels (0: no blur).
        mode: "add" or "mul".
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        ``AnomalyMap(maps (B, 1, H, W), scores (B,))``.
    """
    checks.check_levels(OP, teachers, students)
    checks.check_size(OP, size)
    checks.check_sigma(OP, sigma)
    checks.check_choice(OP, "mode", mode, ("add", "mul"))
    dispatch.select_backend(OP, backend, [*teachers, *students], IMPLEMENTED)
    return reference.anomaly_map(teachers, students, size, sigma, mode)
