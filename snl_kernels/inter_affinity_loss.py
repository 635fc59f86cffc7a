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
sizes). The pooled P_T and P_S (fp32, B C_a N_b each) are the only other intermediates.
Triton pools both finer levels and forms their channels' norms in one launch, and keeps the
pooled levels, the four sets of norms and Gd for a unit upstream gradient (written by the
forward's Delta kernel) for the backward when a gradient will be needed (its ``store``
argument); its backward then takes g through the products' normalised operands, which
keeps Gd rounded as the products read it. The CUDA backward recomputes them.

Backends: ``torch`` (reference), ``triton`` (``snl_kernels/_triton/affinity.py``), ``cuda``
(``csrc/affinity.cu``); both kernel backends are ``torch.library`` ops with fake
implementations and registered autograd.
"""

import functools

import torch
from torch import Tensor

from . import _cuda, _triton, checks, dispatch, precision, reference
from ._registration import KernelOp, cuda_kernel_op, eager_function

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
# Triton's take one more argument each. store (forward): nonzero keeps for the backward
# (the caller decides from grad mode and requires_grad) the pooled levels P_T, P_S, the
# inverse norms (r_pt, r_ps, r_qt, r_qs) and dL/dDelta for a unit upstream gradient (the
# Delta kernel writes it beside the loss's partial sums), returned as ``saved`` (empty
# otherwise); the backward given them forms no Delta, pools and normalises nothing.
TRITON_FWD_SCHEMA = FWD_SCHEMA.replace("str precision)", "str precision, int store=0)")
TRITON_FWD_SCHEMA = TRITON_FWD_SCHEMA[:-len("Tensor")] + "(Tensor loss, Tensor[] saved)"
TRITON_BWD_SCHEMA = BWD_SCHEMA.replace("bool teacher_requires_grad)",
                                       "bool teacher_requires_grad, Tensor[]? saved=None)")


def _kernels():
    return _triton.kernels("affinity")


def _operands(k, teacher_a, teacher_b, student_a, student_b, distance, precision):
    """The pooled finer level, the four sets of channel norms and, where the pair takes
    prepared operands (``affinity_prepared.inter_applies``), level b's (whose launch forms
    its norms), else None."""
    size = tuple(teacher_b.shape[-2:])
    (p_t, r_pt), (p_s, r_ps) = k.pool_with_norms([teacher_a, student_a], [size, size], EPS)
    if k.inter_applies(distance, precision, size[0] * size[1]):
        prepared = k.inter_prepare(student_b, teacher_b, EPS)
        return p_t, p_s, [r_pt, r_ps, prepared[1], prepared[0]], prepared
    norms = [r_pt, r_ps, k.inv_norms(teacher_b, False, EPS), k.inv_norms(student_b, False, EPS)]
    return p_t, p_s, norms, None


def _coef(B: int, C_a: int, C_b: int, distance: str) -> float:
    """dL/dDelta over (the upstream gradient times Delta or sign(Delta))."""
    return (1.0 if distance == "l1" else 2.0) / (B * C_a * C_b)


def _triton_fwd_body(teacher_a, teacher_b, student_a, student_b, distance, precision,
                     store=0):
    k = _kernels()
    p_t, p_s, norms, prepared = _operands(k, teacher_a, teacher_b, student_a, student_b,
                                          distance, precision)
    unit = None
    if store:
        # dL/dDelta for a unit upstream gradient, written beside the loss's partial sums;
        # the backward scales its products by the upstream gradient.
        B, C_a = teacher_a.shape[:2]
        C_b = teacher_b.shape[1]
        unit = (torch.empty((B, C_a, C_b), device=teacher_a.device, dtype=torch.float32),
                _coef(B, C_a, C_b, distance))
    loss = triton_forward(p_t, p_s, teacher_b, student_b, norms, teacher_a.shape[1], distance,
                          precision, unit, prepared)
    return loss, [p_t, p_s, *norms, unit[0]] if store else []


def triton_forward(p_t, p_s, teacher_b, student_b, norms, c_a, distance, precision,
                   unit_grad=None, prepared=None):
    """The Triton forward from the pooled finer level ``p_t``, ``p_s`` and the inverse norms
    ``(r_pt, r_ps, r_qt, r_qs)`` of the channels of the pooled level and of level b;
    ``unit_grad``: (out, coef) for ``delta``'s unit gradient, or None; ``prepared``: level
    b's operands as :func:`_operands` gives them, or None."""
    parts = _delta(p_t, p_s, teacher_b, student_b, norms, distance, precision, unit_grad,
                   prepared)
    return parts.sum() / (teacher_b.shape[0] * c_a * teacher_b.shape[1])


def _delta(p_t, p_s, teacher_b, student_b, norms, distance, precision, unit_grad, prepared):
    """The Delta kernel's per-tile sums (and with ``unit_grad`` its unit gradient)."""
    k = _kernels()
    r_pt, r_ps, r_qt, r_qs = norms
    if prepared is not None:
        return k.inter_delta_l1(p_s, p_t, r_ps, r_pt, prepared,
                                None if unit_grad is None else unit_grad[0])
    return k.delta(p_s, p_t, student_b, teacher_b, r_ps, r_pt, r_qs, r_qt, pix_rows=False,
                   l1=distance == "l1", precision=precision, unit_grad=unit_grad)


def _triton_bwd_body(teacher_a, teacher_b, student_a, student_b, grad_loss, distance,
                     precision, teacher_requires_grad, saved=None):
    unit = prepared = None
    if saved:
        p_t, p_s, *norms, unit = saved
    else:
        p_t, p_s, norms, prepared = _operands(_kernels(), teacher_a, teacher_b, student_a,
                                              student_b, distance, precision)
    return triton_backward(teacher_a, teacher_b, student_a, student_b, p_t, p_s, norms,
                           grad_loss, distance, precision, teacher_requires_grad, unit,
                           prepared)


def triton_backward(teacher_a, teacher_b, student_a, student_b, p_t, p_s, norms, grad_loss,
                    distance, precision, teacher_requires_grad, unit_grad=None,
                    prepared=None):
    """The Triton backward from the pooled level and the norms (see :func:`triton_forward`)
    and the forward's unit gradient of Delta, or None (then from ``prepared`` operands where
    given): gradients of (teacher_a, teacher_b, student_a, student_b), the teacher's empty
    when not asked for."""
    k = _kernels()
    sides = triton_backward_normalised(teacher_a, teacher_b, student_a, student_b, p_t, p_s,
                                       norms, grad_loss, distance, precision,
                                       teacher_requires_grad, unit_grad, unit=True,
                                       prepared=prepared)
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
    coef = _coef(B, C_a, teacher_b.shape[1], distance)
    g = grad_loss.to(torch.float32).reshape(1)
    return dict(a_s=p_s, a_t=p_t, b_s=student_b, b_t=teacher_b, r_as=r_ps, r_at=r_pt,
                r_bs=r_qs, r_bt=r_qt, pix_rows=False, l1=distance == "l1",
                precision=precision, grad=(g, coef))


def triton_backward_normalised(teacher_a, teacher_b, student_a, student_b, p_t, p_s, norms,
                               grad_loss, distance, precision, teacher_requires_grad, gd=None,
                               unit=False, prepared=None):
    """What the backward still has to run after the gradient of Delta, per side:
    ``(teacher, student)``, each None (the teacher's, when not asked for) or
    ``(mm_jobs, (p_job, q_job), f_a)``: the two ``scaled_mm`` jobs giving dL/dP^ and dL/dQ^
    (for the normalised pooled level and level b), the two functions that make a
    ``norm_backward`` job of each product, and the finer level the pooled gradient goes back
    to through ``unpool``. ``gd``: dL/dDelta when already formed (:func:`delta_grad_job`);
    with ``unit``, for a unit upstream gradient (the forward's), and the products take
    ``grad_loss`` through their operands' norms; formed here as the forward forms it (from
    ``prepared`` operands where given) when ``gd`` is None."""
    k = _kernels()
    r_pt, r_ps, r_qt, r_qs = norms
    mm_norms = norms
    B, C_a = teacher_a.shape[:2]
    coef = _coef(B, C_a, teacher_b.shape[1], distance)
    if gd is None and unit:
        # What the forward keeps, formed here: the backward is the same with or without it.
        gd = torch.empty((B, C_a, teacher_b.shape[1]), device=teacher_a.device,
                         dtype=torch.float32)
        _delta(p_t, p_s, teacher_b, student_b, norms, distance, precision, (gd, coef),
               prepared)
    if gd is None:
        gd = k.delta_group([delta_grad_job(teacher_a, teacher_b, student_a, student_b, p_t,
                                           p_s, norms, grad_loss, distance, precision)])[0]
    elif unit:
        # g (Gd_unit Q^) = Gd_unit (g Q^): the operand made in registers takes g, so Gd stays
        # rounded as the products read it.
        mm_norms = torch._foreach_mul(list(norms), grad_loss.to(torch.float32))
    mm_r = dict(zip((id(r) for r in norms), mm_norms, strict=True))
    # l1's unit gradient is sign(Delta), exact in tf32: its products take coef, and at
    # tf32x3 only Q^'s and P^'s two parts (products with no wait on Hopper).
    alpha, mm_dot = 1.0, precision
    if unit and distance == "l1":
        alpha = coef
        mm_dot = "tf32x3-exact-b" if precision == "tf32x3" else precision

    def side(sign, f_a, p, r_p, f_b, r_q):
        # dL/dP^ = sign Gd Q^, dL/dQ^ = sign Gd^T P^ (then the normalisations and pooling).
        mm = [(gd, f_b, mm_r[id(r_q)], sign * alpha, mm_dot),
              (gd.transpose(1, 2), p, mm_r[id(r_p)], sign * alpha, mm_dot)]
        out_q = None if f_b.dtype == torch.float32 else f_b.new_empty(f_b.shape)
        return (mm, (lambda d_p: (p, r_p, d_p, False, None),
                     lambda d_q: (f_b, r_q, d_q, False, out_q)), f_a)

    student = side(-1.0, student_a, p_s, r_ps, student_b, r_qs)
    teacher = (side(1.0, teacher_a, p_t, r_pt, teacher_b, r_qt) if teacher_requires_grad
               else None)
    return teacher, student


_triton_fwd = torch.library.custom_op("snl_triton::inter_affinity_fwd", _triton_fwd_body,
                                      mutates_args=(), schema=TRITON_FWD_SCHEMA)
_triton_bwd = torch.library.custom_op("snl_triton::inter_affinity_bwd", _triton_bwd_body,
                                      mutates_args=(), schema=TRITON_BWD_SCHEMA)


def _fake_fwd(backend, teacher_a, teacher_b, student_a, student_b, distance, precision,
              store=0):
    loss = teacher_a.new_empty((), dtype=torch.float32)
    if backend != "triton":
        return loss
    if not store:
        return loss, []
    B, C_a = teacher_a.shape[:2]
    C_b, H_b, W_b = teacher_b.shape[1:]
    pooled = [teacher_a.new_empty((B, C_a, H_b, W_b), dtype=torch.float32) for _ in range(2)]
    norms = [teacher_a.new_empty((B, c), dtype=torch.float32) for c in (C_a, C_a, C_b, C_b)]
    return loss, [*pooled, *norms, teacher_a.new_empty((B, C_a, C_b), dtype=torch.float32)]


def _fake_bwd(teacher_a, teacher_b, student_a, student_b, grad_loss, distance, precision,
              teacher_requires_grad, saved=None):
    if teacher_requires_grad:
        ga_t, gb_t = teacher_a.new_empty(teacher_a.shape), teacher_b.new_empty(teacher_b.shape)
    else:
        ga_t, gb_t = teacher_a.new_empty((0,)), teacher_b.new_empty((0,))
    # Gradients are contiguous whatever the inputs' layout, in both backends.
    return ga_t, gb_t, student_a.new_empty(student_a.shape), student_b.new_empty(student_b.shape)


def _setup_context(ctx, inputs, output):
    *features, distance, dot = inputs[:6]  # (Triton's store after them)
    ctx.plan = (distance, dot)
    saved = output[1] if isinstance(output, tuple) else ()
    if saved:
        ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(*features, *saved)


def _make_backward(bwd_op, takes_saved: bool):
    def backward(ctx, grad_loss, *_):
        need = ctx.needs_input_grad
        need_teacher = bool(need[0] or need[1])
        features, saved = ctx.saved_tensors[:4], ctx.saved_tensors[4:]
        extra = (list(saved),) if takes_saved and saved else ()
        grads = bwd_op(*features, grad_loss.to(torch.float32), *ctx.plan, need_teacher, *extra)
        return (*(g if n else None for g, n in zip(grads, need[:4], strict=True)),
                *[None] * (len(need) - 4))

    return backward


def _register(backend: str, fwd: str, bwd: str, bwd_op) -> None:
    torch.library.register_fake(fwd)(functools.partial(_fake_fwd, backend))
    torch.library.register_fake(bwd)(_fake_bwd)
    torch.library.register_autograd(fwd, _make_backward(bwd_op, backend == "triton"),
                                    setup_context=_setup_context)


_register("triton", "snl_triton::inter_affinity_fwd", "snl_triton::inter_affinity_bwd",
          _triton_bwd)
_FORWARD_OPS = {"triton": KernelOp(torch.ops.snl_triton.inter_affinity_fwd, eager_function(
    _triton_fwd_body, _triton_bwd_body, functools.partial(_make_backward, takes_saved=True),
    _setup_context, differentiable=1), _triton_fwd_body)}
if _cuda.has_op("inter_affinity_fwd"):
    _register("cuda", "snl::inter_affinity_fwd", "snl::inter_affinity_bwd",
              torch.ops.snl.inter_affinity_bwd.default)
    _FORWARD_OPS["cuda"] = cuda_kernel_op(torch.ops.snl.inter_affinity_fwd,
                                          torch.ops.snl.inter_affinity_bwd.default,
                                          functools.partial(_make_backward, takes_saved=False),
                                          _setup_context)


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
    dot = precision.inter_plan(chosen, teacher_a, teacher_b, distance)
    if chosen == "triton":
        store = int(torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        return _FORWARD_OPS[chosen].leading(*tensors, distance, dot, store)[0]
    return _FORWARD_OPS[chosen](*tensors, distance, dot)
