"""Intra-affinity distillation loss (SPEC §2.2): pixel-to-pixel cosine affinities.

Only the reference backend exists so far; the fused kernels (never forming the N x N
matrix) are tracked by the affinity issue. Explicit ``backend="triton"`` or ``"cuda"``
raises ``BackendUnavailableError`` saying so; automatic mode uses the reference.
"""

from torch import Tensor

from . import checks, dispatch, reference

OP = "intra_affinity_loss"
IMPLEMENTED: tuple[str, ...] = ()


def intra_affinity_loss(teacher: Tensor, student: Tensor, distance: str = "l2",
                        backend: str | None = None) -> Tensor:
    """``mean (A_T - A_S)^2`` ("l2") or ``mean |A_T - A_S|`` ("l1"), ``A = X^T X``.

    Args:
        teacher: (B, C, H, W) teacher features.
        student: (B, C, H, W) student features, same shape, dtype and device.
        distance: "l2" or "l1".
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        0-dim float32 loss (float64 for float64 inputs).
    """
    checks.check_features(OP, teacher, student)
    checks.check_choice(OP, "distance", distance, ("l2", "l1"))
    dispatch.select_backend(OP, backend, (teacher, student), IMPLEMENTED)
    return reference.intra_affinity_loss(teacher, student, distance)
