"""Inter-affinity distillation loss (DESIGN §2.3): cross-level channel affinities.

Math. For a finer level a and a coarser level b: ``P = adaptive_avg_pool(F_a to F_b's
H, W)`` (C_a x N_b), ``Q = F_b`` (C_b x N_b); each channel's row is normalised,
``P^ = P / max(|P|_row, eps)``, and ``G = P^ Q^^T`` (C_a x C_b, small). With
``D_P = P^_S - P^_T`` and ``D_Q = Q^_S - Q^_T``,

    Delta = G_T - G_S = -(P^_S D_Q^T + D_P Q^_T^T)

one product of stacked operands whose rounding scales with the difference. The loss is
``mean Delta^2`` ("l2") or ``mean |Delta|`` ("l1") over B C_a C_b. Each program forms a tile
of Delta over all N_b pixels and reduces it to a partial sum.

Backward, with ``Gd = dL/dDelta`` (``2 g Delta / M`` or ``g sign(Delta) / M``) written once
(B C_a C_b floats): ``dL/dP^_S = -Gd Q^_S``, ``dL/dQ^_S = -Gd^T P^_S``, ``dL/dP^_T = Gd Q^_T``,
``dL/dQ^_T = Gd^T P^_T``; then back through the row normalisation (``df = r (dx - x (x .
dx))``) and, for P, the pooling (each input pixel gets its bins' gradients over the bin
sizes). The pooled P_T and P_S (fp32, B C_a N_b each) are the only other intermediates;
backward recomputes them.

Backends: ``torch`` (reference), ``triton`` (``snl_kernels/_triton/affinity.py``), ``cuda``
(``csrc/affinity.cu``); both kernel backends are ``torch.library`` ops with fake
implementations and registered autograd.
"""

import torch
from torch import Tensor

from . import _triton, checks, dispatch, precision, reference
from ._registration import register_kernel_ops

OP = "inter_affinity_loss"
EPS = reference.EPS
IMPLEMENTED: tuple[str, ...] = ("triton", "cuda")

# The schemas of both kernel backends (csrc/ops.cpp has the CUDA ones, the same); precision:
# snl_kernels/precision.py.
FWD_SCHEMA = ("(Tensor teacher_a, Tensor teacher_b, Tensor student_a, Tensor student_b, "
              "str distance, str precision) -> Tensor")
BWD_SCHEMA = ("(Tensor teacher_a, Tensor teacher_b, Tensor student_a, Tensor student_b, "
              "Tensor grad_loss, str distance, str precision, bool teacher_requires_grad) -> "
              "(Tensor grad_teacher_a, Tensor grad_teacher_b, Tensor grad_student_a, "
              "Tensor grad_student_b)")


def _kernels():
    return _triton.kernels("affinity")


def _operands(k, teacher_a, teacher_b, student_a, student_b):
    size = tuple(teacher_b.shape[-2:])
    p_t, p_s = k.pool(teacher_a, size), k.pool(student_a, size)
    norms = [k.inv_norms(x, False, EPS) for x in (p_t, p_s, teacher_b, student_b)]
    return p_t, p_s, norms


def _triton_fwd_body(teacher_a, teacher_b, student_a, student_b, distance, precision):
    k = _kernels()
    p_t, p_s, norms = _operands(k, teacher_a, teacher_b, student_a, student_b)
    return triton_forward(p_t, p_s, teacher_b, student_b, norms, teacher_a.shape[1], distance,
                          precision)


def triton_forward(p_t, p_s, teacher_b, student_b, norms, c_a, distance, precision):
    """The Triton forward from the pooled finer level ``p_t``, ``p_s`` and the inverse norms
    ``(r_pt, r_ps, r_qt, r_qs)`` of the channels of the pooled level and of level b."""
    r_pt, r_ps, r_qt, r_qs = norms
    parts = _kernels().delta(p_s, p_t, student_b, teacher_b, r_ps, r_pt, r_qs, r_qt,
                             pix_rows=False, l1=distance == "l1", precision=precision)
    return parts.sum() / (teacher_b.shape[0] * c_a * teacher_b.shape[1])


def _triton_bwd_body(teacher_a, teacher_b, student_a, student_b, grad_loss, distance,
                     precision, teacher_requires_grad):
    k = _kernels()
    p_t, p_s, norms = _operands(k, teacher_a, teacher_b, student_a, student_b)
    return triton_backward(teacher_a, teacher_b, student_a, student_b, p_t, p_s, norms,
                           grad_loss, distance, precision, teacher_requires_grad)


def triton_backward(teacher_a, teacher_b, student_a, student_b, p_t, p_s, norms, grad_loss,
                    distance, precision, teacher_requires_grad):
    """The Triton backward from the pooled level and the norms (see :func:`triton_forward`):
    gradients of (teacher_a, teacher_b, student_a, student_b), the teacher's empty when not
    asked for."""
    k = _kernels()
    sides = triton_backward_normalised(teacher_a, teacher_b, student_a, student_b, p_t, p_s,
                                       norms, grad_loss, distance, precision,
                                       teacher_requires_grad)
    mm = [job for side in sides if side is not None for job in side[0]]
    products = iter(k.scaled_mm_group(mm))
    grads = []
    for side in sides:
        if side is None:
            grads += [teacher_a.new_empty((0,)), teacher_b.new_empty((0,))]
            continue
        _, (p_job, q_job), f_a = side
        d_p, d_q = k.norm_backward_group([p_job(next(products)), q_job(next(products))], EPS)
        grads += [k.unpool(d_p, f_a), d_q]
    ga_t, gb_t, ga_s, gb_s = grads
    return ga_t, gb_t, ga_s, gb_s


def delta_grad_job(teacher_a, teacher_b, student_a, student_b, p_t, p_s, norms, grad_loss,
                   distance, precision) -> dict:
    """The ``delta`` job (keyword arguments) of dL/dDelta, (B, C_a, C_b) fp32."""
    r_pt, r_ps, r_qt, r_qs = norms
    B, C_a = teacher_a.shape[:2]
    coef = (1.0 if distance == "l1" else 2.0) / (B * C_a * teacher_b.shape[1])
    g = grad_loss.to(torch.float32).reshape(1)
    return dict(a_s=p_s, a_t=p_t, b_s=student_b, b_t=teacher_b, r_as=r_ps, r_at=r_pt,
                r_bs=r_qs, r_bt=r_qt, pix_rows=False, l1=distance == "l1",
                precision=precision, grad=(g, coef))


def triton_backward_normalised(teacher_a, teacher_b, student_a, student_b, p_t, p_s, norms,
                               grad_loss, distance, precision, teacher_requires_grad, gd=None):
    """What the backward still has to run after the gradient of Delta, per side:
    ``(teacher, student)``, each None (the teacher's, when not asked for) or
    ``(mm_jobs, (p_job, q_job), f_a)``: the two ``scaled_mm`` jobs giving dL/dP^ and dL/dQ^
    (for the normalised pooled level and level b), the two functions that make a
    ``norm_backward`` job of each product, and the finer level the pooled gradient goes back
    to through ``unpool``. ``gd``: dL/dDelta when already formed (:func:`delta_grad_job`)."""
    k = _kernels()
    r_pt, r_ps, r_qt, r_qs = norms
    if gd is None:
        gd = k.delta_group([delta_grad_job(teacher_a, teacher_b, student_a, student_b, p_t,
                                           p_s, norms, grad_loss, distance, precision)])[0]

    def side(sign, f_a, p, r_p, f_b, r_q):
        # dL/dP^ = sign Gd Q^, dL/dQ^ = sign Gd^T P^ (then the normalisations and pooling).
        mm = [(gd, f_b, r_q, sign, precision), (gd.transpose(1, 2), p, r_p, sign, precision)]
        out_q = None if f_b.dtype == torch.float32 else f_b.new_empty(f_b.shape)
        return (mm, (lambda d_p: (p, r_p, d_p, False, None),
                     lambda d_q: (f_b, r_q, d_q, False, out_q)), f_a)

    student = side(-1.0, student_a, p_s, r_ps, student_b, r_qs)
    teacher = (side(1.0, teacher_a, p_t, r_pt, teacher_b, r_qt) if teacher_requires_grad
               else None)
    return teacher, student


_triton_fwd = torch.library.custom_op("snl_triton::inter_affinity_fwd", _triton_fwd_body,
                                      mutates_args=(), schema=FWD_SCHEMA)
_triton_bwd = torch.library.custom_op("snl_triton::inter_affinity_bwd", _triton_bwd_body,
                                      mutates_args=(), schema=BWD_SCHEMA)


def _fake_fwd(teacher_a, teacher_b, student_a, student_b, distance, precision):
    return teacher_a.new_empty((), dtype=torch.float32)


def _fake_bwd(teacher_a, teacher_b, student_a, student_b, grad_loss, distance, precision,
              teacher_requires_grad):
    if teacher_requires_grad:
        ga_t, gb_t = teacher_a.new_empty(teacher_a.shape), teacher_b.new_empty(teacher_b.shape)
    else:
        ga_t, gb_t = teacher_a.new_empty((0,)), teacher_b.new_empty((0,))
    # Gradients are contiguous whatever the inputs' layout, in both backends.
    return ga_t, gb_t, student_a.new_empty(student_a.shape), student_b.new_empty(student_b.shape)


def _setup_context(ctx, inputs, output):
    *features, distance, dot = inputs
    ctx.plan = (distance, dot)
    ctx.save_for_backward(*features)


def _make_backward(bwd_op):
    def backward(ctx, grad_loss):
        need = ctx.needs_input_grad
        need_teacher = bool(need[0] or need[1])
        grads = bwd_op(*ctx.saved_tensors, grad_loss.to(torch.float32), *ctx.plan,
                       need_teacher)
        return (*(g if n else None for g, n in zip(grads, need[:4], strict=True)), None, None)

    return backward


_FORWARD_OPS = register_kernel_ops("inter_affinity_fwd", "inter_affinity_bwd", _triton_bwd,
                                   _fake_fwd, _fake_bwd, _make_backward, _setup_context,
                                   (_triton_fwd_body, _triton_bwd_body))


def inter_affinity_loss(teacher_a: Tensor, teacher_b: Tensor, student_a: Tensor,
                        student_b: Tensor, distance: str = "l2",
                        backend: str | None = None) -> Tensor:
    """``mean (G_T - G_S)^2`` ("l2") or ``mean |G_T - G_S|`` ("l1"), ``G = P^ Q^^T``.

    Args:
        teacher_a, teacher_b, student_a, student_b, distance: as
            ``snl_kernels.reference.inter_affinity_loss`` (levels a finer than b).
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        0-dim float32 loss (float64 for float64 inputs, which only the reference takes).

    Raises:
        TypeError, ValueError: bad features, levels or distance (the message names which).
        BackendUnavailableError: the requested backend cannot run here (with the reasons).
    """
    checks.check_inter(OP, teacher_a, teacher_b, student_a, student_b, distance)
    tensors = (teacher_a, teacher_b, student_a, student_b)
    why_not = None
    if teacher_a.dtype == torch.float64:
        why_not = "float64 inputs run on the reference only"
    chosen = dispatch.select_backend(OP, backend, tensors, IMPLEMENTED, why_not=why_not)
    if chosen == "torch":
        return reference.inter_affinity_loss(*tensors, distance)
    return _FORWARD_OPS[chosen](*tensors, distance,
                                precision.inter_plan(chosen, teacher_a, teacher_b, distance))
