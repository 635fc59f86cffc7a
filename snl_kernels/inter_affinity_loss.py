"""Inter-affinity distillation loss (SPEC §2.3): cross-level channel affinities.

Only the reference backend exists so far; the fused kernels are tracked by the affinity
issue. Explicit ``backend="triton"`` or ``"cuda"`` raises ``BackendUnavailableError`` saying
so; automatic mode uses the reference.
"""

from torch import Tensor

from . import checks, dispatch, reference

OP = "inter_affinity_loss"
IMPLEMENTED: tuple[str, ...] = ()


def inter_affinity_loss(teacher_a: Tensor, teacher_b: Tensor, student_a: Tensor,
                        student_b: Tensor, distance: str = "l2",
                        backend: str | None = None) -> Tensor:
    """``mean (G_T - G_S)^2`` ("l2") or ``mean |G_T - G_S|`` ("l1"), ``G = P^ Q^^T``.

    Args:
        teacher_a: (B, C_a, H_a, W_a) teacher features of the finer level.
        teacher_b: (B, C_b, H_b, W_b) teacher features of the coarser level.
        student_a: student features matching ``teacher_a``.
        student_b: student features matching ``teacher_b``.
        distance: "l2" or "l1".
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        0-dim float32 loss (float64 for float64 inputs).
    """
    checks.check_inter(OP, teacher_a, teacher_b, student_a, student_b, distance)
    dispatch.select_backend(OP, backend, (teacher_a, teacher_b, student_a, student_b),
                            IMPLEMENTED)
    return reference.inter_affinity_loss(teacher_a, teacher_b, student_a, student_b, distance)
