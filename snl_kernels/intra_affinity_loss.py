"""Intra-affinity distillation loss (DESIGN §2.2) without N x N matrices in memory.

Math. Per sample, X = F / max(|F|_C, eps) per pixel (C x N), A = X^T X (N x N), Delta =
A_T - A_S, M = B N^2; the loss is ``sum ||Delta||^2 / M`` ("l2") or ``sum |Delta| / M``
("l1"). With D = X_S - X_T (formed in fp32 from the normalised columns),

    Delta = -(X_S^T D + D^T X_T)

so rounding errors scale with the difference, not with the affinities (the plain
``A_T - A_S`` cancels when the student is close to the teacher). Two forms:

- C x C Grams (l2 when C < N), ``G_ab = X_a X_b^T``, over the tile pairs I <= J only. Triton:
  ``||Delta||^2 = (<G_EE, G_DD> + <G_ED, G_DE>) / 2`` with E = X_S + X_T (four products per
  pair), and the same four products give the backward's Grams, which the loss kernel writes
  when a gradient will be needed (this op's forward and the fused loss keep them for the
  backward). CUDA (``csrc/gram_host.h``): the same
  sum from one cuBLAS product ``[E; D][E; D]^T`` of operands one kernel forms, and backward
  ``(g / M) [G_DD + G_ED, G_DE + G_EE] [E; D]`` (the product below, regrouped), the Gram
  formed again. Backward: ``dL/dX_S = (4 g / M)(G_SS D + G_SD X_T)``,
  ``dL/dX_T = -(4 g / M)(G_TS D + G_TD X_T)`` (g the upstream gradient), through Grams of
  B C^2 floats each. Triton forms the same as ``(4 g / M)(P_S D + Q_S E)`` and
  ``-(4 g / M)(P_T D + Q_T E)`` with ``P_a = X_a E^T / 2``, ``Q_a = X_a D^T / 2``, which the
  loss kernel writes already rounded as the products' operands, so that those products
  read them as they are (pipelined wgmma on Hopper).
- Tiled (l1, and l2 when N <= C): tiles of Delta formed on chip from the stacked operands
  and reduced there. Backward: ``dL/dX_S = -2 X_S G``, ``dL/dX_T = 2 X_T G`` with
  ``G = dL/dDelta`` (``2 g Delta / M`` or ``g sign(Delta) / M``, symmetric), the Delta tiles
  recomputed on chip for each block of pixels and channels. Except in Triton: its l1
  forward keeps the signs of Delta as bits (B N^2 / 8 bytes; 32 MB at WRN50 level 1,
  B = 16), and its l2 forward, when a gradient will be needed, Delta itself (B N^2 floats,
  no more than the features since N <= C on this path; 4 MB at WRN50 level 3), so its
  backward is one product with the +-1 matrix or with Delta instead of three (two to
  recompute Delta, then the product): about half of l1's fwd+bwd work.

Then through the normalisation, per pixel: ``df = r (dx - x (x . dx))`` with ``r = 1 /
max(|f|, eps)`` (the projection drops where the norm is clamped). Triton's forward keeps the
inverse norms (and on the Gram path the Grams) for the backward when a gradient will be
needed (its ``store`` argument); the CUDA backward recomputes them from the inputs.

Path and precision are decided once per call, in ``snl_kernels/precision.py`` (the rule,
and what each backend runs), and passed to the ops as arguments: for l2 from 256 pixels, one
tf32 product with operands rounded to nearest; for l1 (whose gradient is sign(Delta)) and
small l2, three tf32 products (CUDA's tiled kernels: fp32 FMA); ``SNL_DOT_PRECISION``
overrides.
For l1, Delta is set to exactly 0 where the reference's is, i.e. where a zero teacher vector
and a zero student vector meet (row or column): the difference form's ``+-x . y`` terms
cancel there only up to the order of the hardware's sums, and a stray sign would move the
gradient by the 1 / eps of a clamped norm.

Backends: ``torch`` (reference, materialises N x N; automatic mode without a kernel backend
runs the l2 Gram form in PyTorch instead, :mod:`snl_kernels.gram_path`), ``triton``
(``snl_kernels/_triton/affinity.py``), ``cuda`` (``csrc/affinity.cu``), both kernel backends
``torch.library`` ops with fake implementations and registered autograd.
"""

import functools

import torch
from torch import Tensor

from . import _cuda, _triton, checks, dispatch, gram_path, precision, reference
from ._registration import KernelOp, cuda_kernel_op, eager_function
from .precision import use_grams  # noqa: F401  (the path rule, where callers looked for it)

OP = "intra_affinity_loss"
EPS = reference.EPS
IMPLEMENTED: tuple[str, ...] = ("triton", "cuda")

# The schemas of both kernel backends (csrc/ops.cpp has the CUDA ones, the same). grams and
# precision: snl_kernels/precision.py. signs: Triton's l1 forward keeps the signs of Delta
# (int32 bit words, see _signs_shape), which its backward reads instead of recomputing Delta;
# empty otherwise (l2, and the CUDA backend, which recomputes).
FWD_SCHEMA = ("(Tensor teacher, Tensor student, str distance, bool grams, str precision) -> "
              "(Tensor loss, Tensor signs)")
BWD_SCHEMA = ("(Tensor teacher, Tensor student, Tensor grad_loss, Tensor signs, str distance, "
              "bool grams, str precision, bool teacher_requires_grad) -> "
              "(Tensor grad_teacher, Tensor grad_student)")
# Triton's take one more argument each. store (forward): what to keep for the backward, 0
# nothing, 1 for the student's gradient, 2 for the teacher's too (the caller decides from
# grad mode and requires_grad); saved: the pixels' inverse norms (r_t, r_s), then on the Gram
# path the Grams the loss kernel wrote (2 per side, ``affinity_gram.gram_loss``), on the
# tiled l2 path Delta (B, N, N), or nothing. The backward recomputes what it is not given.
TRITON_FWD_SCHEMA = FWD_SCHEMA.replace(
    "str precision)", "str precision, int store=0)").replace(
    "Tensor signs)", "Tensor signs, Tensor[] saved)")
TRITON_BWD_SCHEMA = BWD_SCHEMA.replace("bool teacher_requires_grad)",
                                       "bool teacher_requires_grad, Tensor[]? saved=None)")


def _kernels():
    return _triton.kernels("affinity")


def _signs_shape(backend: str, teacher: Tensor, distance: str) -> tuple[int, ...]:
    """Triton l1: bit j % 32 of word [b, i, j // 32] is Delta[b, i, j] > 0 (upper triangle of
    tiles only; B N^2 / 8 bytes, 32 MB for WRN50 level 1 at B = 16). Otherwise nothing."""
    B, _, H, W = teacher.shape
    N = H * W
    return (B, N, (N + 31) // 32) if backend == "triton" and distance == "l1" else (0,)


def _pixel_norms(teacher, student, grams, precision):
    """(r_t, r_s, prepared): the pixels' inverse norms and, where the Gram path's loss reads
    prepared operands (``affinity_gram.gram_prepare``, which forms the norms in the same
    launch), [E; D]; else None."""
    k = _kernels()
    if grams and k.prepared_applies(teacher.shape[1], precision):
        ed, r_s, r_t = k.gram_prepare(student, teacher, EPS, precision)
        return r_t, r_s, ed
    return k.inv_norms(teacher, True, EPS), k.inv_norms(student, True, EPS), None


def _triton_fwd_body(teacher, student, distance, grams, precision, store=0):
    r_t, r_s, prepared = _pixel_norms(teacher, student, grams, precision)
    loss, signs, stored = triton_forward(teacher, student, r_t, r_s, distance, grams,
                                         precision, store, prepared)
    return loss, signs, [r_t, r_s, *stored] if store else []


def triton_forward(teacher, student, r_t, r_s, distance, grams, precision, store=0,
                   prepared=None):
    """The Triton forward from the pixels' inverse norms ``r_t``, ``r_s`` (B, N) (a zero
    pixel's negative, as ``_inv_norm_kernel`` writes them): (loss, signs, what the forward
    keeps for the backward with ``store`` as the op's: the Gram path's Grams, or the tiled
    l2 path's Delta (B, N, N); a tuple, empty where none). ``prepared``: the Gram path's
    operands, as ``_pixel_norms`` gives them with the norms."""
    k = _kernels()
    B, _, H, W = teacher.shape
    N = H * W
    signs = teacher.new_empty(_signs_shape("triton", teacher, distance), dtype=torch.int32)
    stored = ()
    if grams:
        parts, stored = k.gram_loss(student, teacher, r_s, r_t, precision, store, prepared)
    else:
        # l2 keeps Delta itself (B N^2 floats: no more than the features, N <= C on this
        # path), l1 its sign bits.
        if store and distance == "l2":
            stored = (torch.empty((B, N, N), device=teacher.device, dtype=torch.float32),)
        parts = k.delta(student, teacher, student, teacher, r_s, r_t, r_s, r_t,
                        pix_rows=True, l1=distance == "l1", precision=precision,
                        signs=signs if distance == "l1" else None,
                        stored_delta=stored[0] if stored else None)
    return parts.sum() / (B * N * N), signs, stored or ()


def _triton_bwd_body(teacher, student, grad_loss, signs, distance, grams, precision,
                     teacher_requires_grad, saved=None):
    prepared = None
    if saved:
        r_t, r_s, *stored = saved
    else:
        r_t, r_s, prepared = _pixel_norms(teacher, student, grams, precision)
        stored = None
    # Grams kept for the student's side only cannot serve the teacher's gradient.
    if grams and (not stored or len(stored) < (4 if teacher_requires_grad else 2)):
        stored = None
    return triton_backward(teacher, student, r_t, r_s, grad_loss, signs, distance, grams,
                           precision, teacher_requires_grad, stored or None, prepared)


def triton_backward(teacher, student, r_t, r_s, grad_loss, signs, distance, grams, precision,
                    teacher_requires_grad, stored=None, prepared=None):
    """The Triton backward from the pixels' inverse norms (and what the forward kept, as
    :func:`triton_forward` returns it, or None; ``prepared`` as there): (grad_teacher or an
    empty tensor, grad_student)."""
    k = _kernels()
    if grams and k.apply_norm_applies(teacher.shape[1]):
        # The norm backward in the products' launch (affinity_gram.gram_grad_features).
        g = grad_loss.to(torch.float32).reshape(1)
        B, _, H, W = teacher.shape
        g_s, g_t = k.gram_grad_features(student, teacher, r_s, r_t, g,
                                        4.0 / (B * H * W * H * W), teacher_requires_grad,
                                        precision, EPS, stored, prepared)
        return (g_t if g_t is not None else teacher.new_empty((0,))), g_s
    g_t, g_s = triton_backward_normalised(teacher, student, r_t, r_s, grad_loss, signs,
                                          distance, grams, precision, teacher_requires_grad,
                                          stored if grams else None,
                                          None if grams or not stored else stored[0],
                                          prepared)
    grad_teacher = (k.norm_backward_group([norm_job(teacher, r_t, g_t)], EPS)[0] if g_t is not None
                    else teacher.new_empty((0,)))
    return grad_teacher, k.norm_backward_group([norm_job(student, r_s, g_s)], EPS)[0]


def triton_backward_normalised(teacher, student, r_t, r_s, grad_loss, signs, distance, grams,
                               precision, teacher_requires_grad, stored_grams=None,
                               stored_delta=None, prepared=None):
    """The gradients for the normalised features X_T (None when not asked for) and X_S, fp32
    (B, C, H, W); :func:`norm_job` turns each into a job of ``norm_backward``.
    ``stored_grams``: on the Gram path, the Grams the forward wrote (``gram_loss`` with
    ``store``); None forms them here. ``stored_delta``: on the tiled l2 path, the Delta the
    forward wrote; None forms its tiles again. ``prepared``: the Gram path's operands
    (``_pixel_norms``), from which Grams not stored are formed again."""
    k = _kernels()
    B, _, H, W = teacher.shape
    M = B * H * W * H * W
    g = grad_loss.to(torch.float32).reshape(1)
    if grams:
        g_s, g_t = k.gram_grad(student, teacher, r_s, r_t, g, 4.0 / M, teacher_requires_grad,
                               precision, stored_grams, prepared)
    else:
        coef = (2.0 if distance == "l1" else 4.0) / M
        g_s, g_t = k.intra_tiled_grad(student, teacher, r_s, r_t, g, coef, distance == "l1",
                                      teacher_requires_grad, precision,
                                      signs if distance == "l1" else None,
                                      None if distance == "l1" else stored_delta)
    return g_t, g_s


def tiled_grad_job(teacher, student, r_t, r_s, grad_loss, signs, distance, precision,
                   teacher_requires_grad) -> dict:
    """The ``intra_tiled_grad`` job (keyword arguments) of a level on the tiled path."""
    B, _, H, W = teacher.shape
    M = B * H * W * H * W
    return dict(s=student, t=teacher, r_s=r_s, r_t=r_t,
                grad_loss=grad_loss.to(torch.float32).reshape(1),
                coef=(2.0 if distance == "l1" else 4.0) / M, l1=distance == "l1",
                teacher=teacher_requires_grad, precision=precision,
                signs=signs if distance == "l1" else None)


def norm_job(f, r, gx):
    """(f, r, gx, pix_rows, out) for ``norm_backward``: in place in the fp32 gx, or into a
    new tensor of f's dtype."""
    return f, r, gx, True, None if f.dtype == torch.float32 else f.new_empty(f.shape)


_triton_fwd = torch.library.custom_op("snl_triton::intra_affinity_fwd", _triton_fwd_body,
                                      mutates_args=(), schema=TRITON_FWD_SCHEMA)
_triton_bwd = torch.library.custom_op("snl_triton::intra_affinity_bwd", _triton_bwd_body,
                                      mutates_args=(), schema=TRITON_BWD_SCHEMA)


def _fake_fwd(backend, teacher, student, distance, grams, precision, store=0):
    signs = teacher.new_empty(_signs_shape(backend, teacher, distance), dtype=torch.int32)
    loss = teacher.new_empty((), dtype=torch.float32)
    if backend != "triton":
        return loss, signs
    if not store:
        return loss, signs, []
    B, C, H, W = teacher.shape
    saved = [teacher.new_empty((B, H * W), dtype=torch.float32) for _ in range(2)]
    if grams:
        saved += [teacher.new_empty((B, C, C), dtype=torch.float32) for _ in range(2 * store)]
    elif distance == "l2":
        saved.append(teacher.new_empty((B, H * W, H * W), dtype=torch.float32))
    return loss, signs, saved


def _fake_bwd(teacher, student, grad_loss, signs, distance, grams, precision,
              teacher_requires_grad, saved=None):
    # Gradients are contiguous (B, C, H, W) whatever the inputs' layout, in both backends.
    grad_teacher = teacher.new_empty(teacher.shape if teacher_requires_grad else (0,))
    return grad_teacher, student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    teacher, student, distance, grams, dot = inputs[:5]  # (Triton's store after them)
    ctx.plan = (distance, grams, dot)
    saved = output[2] if len(output) > 2 else ()
    ctx.mark_non_differentiable(output[1], *saved)
    ctx.save_for_backward(teacher, student, output[1], *saved)


def _make_backward(bwd_op, takes_saved: bool):
    def backward(ctx, grad_loss, *_):
        teacher, student, signs, *saved = ctx.saved_tensors
        need_teacher = bool(ctx.needs_input_grad[0])
        extra = (saved,) if takes_saved and saved else ()
        grad_teacher, grad_student = bwd_op(teacher, student, grad_loss.to(torch.float32),
                                            signs, *ctx.plan, need_teacher, *extra)
        return (grad_teacher if need_teacher else None,
                grad_student if ctx.needs_input_grad[1] else None,
                *[None] * (len(ctx.needs_input_grad) - 2))

    return backward


def _register(backend: str, fwd: str, bwd: str, bwd_op) -> None:
    torch.library.register_fake(fwd)(functools.partial(_fake_fwd, backend))
    torch.library.register_fake(bwd)(_fake_bwd)
    torch.library.register_autograd(fwd, _make_backward(bwd_op, backend == "triton"),
                                    setup_context=_setup_context)


_register("triton", "snl_triton::intra_affinity_fwd", "snl_triton::intra_affinity_bwd",
          _triton_bwd)
_FORWARD_OPS = {"triton": KernelOp(torch.ops.snl_triton.intra_affinity_fwd, eager_function(
    _triton_fwd_body, _triton_bwd_body, functools.partial(_make_backward, takes_saved=True),
    _setup_context, differentiable=1), _triton_fwd_body)}
if _cuda.has_op("intra_affinity_fwd"):
    _register("cuda", "snl::intra_affinity_fwd", "snl::intra_affinity_bwd",
              torch.ops.snl.intra_affinity_bwd.default)
    _FORWARD_OPS["cuda"] = cuda_kernel_op(torch.ops.snl.intra_affinity_fwd,
                                          torch.ops.snl.intra_affinity_bwd.default,
                                          functools.partial(_make_backward, takes_saved=False),
                                          _setup_context)


def _store(teacher: Tensor, student: Tensor) -> int:
    """What Triton's forward keeps for the backward (the ``store`` argument)."""
    if not torch.is_grad_enabled():
        return 0
    return 2 if teacher.requires_grad else 1 if student.requires_grad else 0


def intra_affinity_loss(teacher: Tensor, student: Tensor, distance: str = "l2",
                        backend: str | None = None) -> Tensor:
    """``mean (A_T - A_S)^2`` ("l2") or ``mean |A_T - A_S|`` ("l1"), ``A = X^T X``.

    Args:
        teacher: (B, C, H, W) teacher features, float16/bfloat16/float32/float64, any strides.
        student: (B, C, H, W) student features, same shape, dtype and device.
        distance: "l2" or "l1".
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        0-dim float32 loss (float64 for float64 inputs, which only the reference takes).

    Raises:
        TypeError, ValueError: bad features or distance (the message names which).
        BackendUnavailableError: the requested backend cannot run here (with the reasons).
    """
    checks.check_features(OP, teacher, student)
    checks.check_choice(OP, "distance", distance, ("l2", "l1"))
    why_not = "float64 inputs run on the reference only" if teacher.dtype == torch.float64 else None
    chosen = dispatch.select_backend(OP, backend, (teacher, student), IMPLEMENTED, why_not=why_not)
    if chosen == "torch":
        if dispatch.requested_backend(backend) is None and gram_path.applies(teacher, distance):
            return gram_path.intra_affinity_l2(teacher, student)  # automatic, no kernels
        return reference.intra_affinity_loss(teacher, student, distance)
    grams, dot = precision.intra_plan(chosen, teacher, distance)
    if chosen == "triton":
        return _FORWARD_OPS[chosen].leading(teacher, student, distance, grams, dot,
                                            _store(teacher, student))[0]
    return _FORWARD_OPS[chosen](teacher, student, distance, grams, dot)[0]
