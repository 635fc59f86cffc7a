"""Intra-affinity distillation loss (SPEC §2.2) without N x N matrices in memory.

Math. Per sample, X = F / max(|F|_C, eps) per pixel (C x N), A = X^T X (N x N), Delta =
A_T - A_S, M = B N^2; the loss is ``sum ||Delta||^2 / M`` ("l2") or ``sum |Delta| / M``
("l1"). With D = X_S - X_T (formed in fp32 from the normalised columns),

    Delta = -(X_S^T D + D^T X_T)

so rounding errors scale with the difference, not with the affinities (the plain
``A_T - A_S`` cancels when the student is close to the teacher). Two forms:

- C x C Grams (l2 when C < N): ``||Delta||^2 = <G_SS + G_TT, G_DD> + 2 <G_SD, G_DT>``,
  ``G_ab = X_a X_b^T``. Each program forms one tile of the five Grams over all pixels and
  reduces it to a partial sum: no Gram reaches memory in the forward. Backward:
  ``dL/dX_S = (4 g / M)(G_SS D + G_SD X_T)``, ``dL/dX_T = -(4 g / M)(G_TS D + G_TD X_T)``
  (g the upstream gradient), with the Grams written once (B C^2 floats each).
- Tiled (l1, and l2 when N <= C): tiles of Delta formed on chip from the stacked operands
  and reduced there. Backward: ``dL/dX_S = -2 X_S G``, ``dL/dX_T = 2 X_T G`` with
  ``G = dL/dDelta`` (``2 g Delta / M`` or ``g sign(Delta) / M``, symmetric), the Delta tiles
  recomputed on chip for each block of pixels and channels. Except Triton l1: its forward
  keeps the signs of Delta as bits (B N^2 / 8 bytes; 32 MB at WRN50 level 1, B = 16), so its
  backward is one product with the +-1 matrix instead of three (two to recompute Delta,
  then the product): about half of l1's fwd+bwd work.

Then through the normalisation, per pixel: ``df = r (dx - x (x . dx))`` with ``r = 1 /
max(|f|, eps)`` (the projection drops where the norm is clamped). Backward recomputes the
norms; nothing but the inputs is saved.

Precision. The products run on tensor cores unless ``SNL_DOT_PRECISION`` says otherwise
(``snl_kernels._triton.affinity.dot_precision`` has the rule and the measured errors): for
l2 from 256 pixels, one tf32 product with operands rounded to nearest; for l1 (whose
gradient is sign(Delta)) and small l2, three tf32 products in Triton and fp32 FMA in CUDA.
For l1, Delta is set to exactly 0 where the reference's is, i.e. where a zero teacher vector
and a zero student vector meet (row or column): the difference form's ``+-x . y`` terms
cancel there only up to the order of the hardware's sums, and a stray sign would move the
gradient by the 1 / eps of a clamped norm.

Backends: ``torch`` (reference, materialises N x N), ``triton``
(``snl_kernels/_triton/affinity.py``), ``cuda`` (``csrc/affinity.cu``), both kernel backends
``torch.library`` ops with fake implementations and registered autograd.
"""

import torch
from torch import Tensor

from . import _cuda, checks, dispatch, reference

OP = "intra_affinity_loss"
EPS = reference.EPS
IMPLEMENTED: tuple[str, ...] = ("triton", "cuda")

# The Triton forward also returns l1's signs of Delta (int32 bit words, see _signs_shape; empty
# for l2), which its backward reads instead of recomputing Delta. The CUDA ops (csrc/ops.cpp)
# take and return the loss alone and recompute.
_TRITON_FWD_SCHEMA = "(Tensor teacher, Tensor student, str distance) -> (Tensor, Tensor)"
_TRITON_BWD_SCHEMA = (
    "(Tensor teacher, Tensor student, Tensor grad_loss, Tensor signs, str distance, "
    "bool teacher_requires_grad) -> (Tensor, Tensor)"
)


def use_grams(channels: int, pixels: int, distance: str) -> bool:
    """Whether the C x C Gram form is used (l2 with fewer channels than pixels)."""
    return distance == "l2" and channels < pixels


def _kernels():
    from ._triton import affinity as kernels

    return kernels


def _signs_shape(teacher: Tensor, distance: str) -> tuple[int, ...]:
    """l1: bit j % 32 of word [b, i, j // 32] is Delta[b, i, j] > 0 (upper triangle of tiles
    only; B N^2 / 8 bytes, 32 MB for WRN50 level 1 at B = 16). l2: nothing."""
    B, _, H, W = teacher.shape
    N = H * W
    return (B, N, (N + 31) // 32) if distance == "l1" else (0,)


@torch.library.custom_op("snl_triton::intra_affinity_fwd", mutates_args=(),
                         schema=_TRITON_FWD_SCHEMA)
def _triton_fwd(teacher, student, distance):
    k = _kernels()
    B, C, H, W = teacher.shape
    N = H * W
    r_t, r_s = k.inv_norms(teacher, True, EPS), k.inv_norms(student, True, EPS)
    signs = teacher.new_empty(_signs_shape(teacher, distance), dtype=torch.int32)
    if use_grams(C, N, distance):
        parts = k.gram_loss(student, teacher, r_s, r_t)
    else:
        parts = k.delta(student, teacher, student, teacher, r_s, r_t, r_s, r_t,
                        pix_rows=True, l1=distance == "l1",
                        signs=signs if distance == "l1" else None)
    return parts.sum() / (B * N * N), signs


@torch.library.custom_op("snl_triton::intra_affinity_bwd", mutates_args=(),
                         schema=_TRITON_BWD_SCHEMA)
def _triton_bwd(teacher, student, grad_loss, signs, distance, teacher_requires_grad):
    k = _kernels()
    B, C, H, W = teacher.shape
    M = B * H * W * H * W
    r_t, r_s = k.inv_norms(teacher, True, EPS), k.inv_norms(student, True, EPS)
    g = grad_loss.to(torch.float32).reshape(1)
    if use_grams(C, H * W, distance):
        g_s, g_t = k.gram_grad(student, teacher, r_s, r_t, g, 4.0 / M, teacher_requires_grad)
    else:
        coef = (2.0 if distance == "l1" else 4.0) / M
        g_s, g_t = k.intra_tiled_grad(student, teacher, r_s, r_t, g, coef, distance == "l1",
                                      teacher_requires_grad,
                                      signs if distance == "l1" else None)

    def finish(f, r, gx):
        out = None if f.dtype == torch.float32 else f.new_empty(f.shape)
        return k.norm_backward(f, r, gx, True, EPS, out)

    grad_teacher = finish(teacher, r_t, g_t) if g_t is not None else teacher.new_empty((0,))
    return grad_teacher, finish(student, r_s, g_s)


def _fake_loss(teacher, student, distance):
    return teacher.new_empty((), dtype=torch.float32)


def _fake_triton_fwd(teacher, student, distance):
    signs = teacher.new_empty(_signs_shape(teacher, distance), dtype=torch.int32)
    return _fake_loss(teacher, student, distance), signs


def _fake_grads(teacher, student, teacher_requires_grad):
    # Gradients are contiguous (B, C, H, W) whatever the inputs' layout, in both backends.
    grad_teacher = teacher.new_empty(teacher.shape if teacher_requires_grad else (0,))
    return grad_teacher, student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    teacher, student, distance = inputs
    ctx.distance = distance
    # Triton: (loss, signs); CUDA: the loss alone.
    if isinstance(output, tuple):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(teacher, student, output[1])
    else:
        ctx.save_for_backward(teacher, student)


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, *grad_signs):
        teacher, student, *signs = ctx.saved_tensors
        need_teacher = bool(ctx.needs_input_grad[0])
        grad_teacher, grad_student = bwd_op(teacher, student, grad_loss.to(torch.float32),
                                            *signs, ctx.distance, need_teacher)
        return (grad_teacher if need_teacher else None,
                grad_student if ctx.needs_input_grad[1] else None, None)

    return backward


torch.library.register_fake("snl_triton::intra_affinity_fwd")(_fake_triton_fwd)
torch.library.register_fake("snl_triton::intra_affinity_bwd")(
    lambda t, s, g, signs, d, need_teacher: _fake_grads(t, s, need_teacher))
torch.library.register_autograd("snl_triton::intra_affinity_fwd", _make_backward(_triton_bwd),
                                setup_context=_setup_context)
_FORWARD_OPS = {"triton": lambda t, s, d: torch.ops.snl_triton.intra_affinity_fwd(t, s, d)[0]}
if _cuda.has_op("intra_affinity_fwd"):
    torch.library.register_fake("snl::intra_affinity_fwd")(_fake_loss)
    torch.library.register_fake("snl::intra_affinity_bwd")(
        lambda t, s, g, d, need_teacher: _fake_grads(t, s, need_teacher))
    torch.library.register_autograd("snl::intra_affinity_fwd",
                                    _make_backward(torch.ops.snl.intra_affinity_bwd.default),
                                    setup_context=_setup_context)
    _FORWARD_OPS["cuda"] = lambda t, s, d: torch.ops.snl.intra_affinity_fwd(t, s, d)


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
        return reference.intra_affinity_loss(teacher, student, distance)
    return _FORWARD_OPS[chosen](teacher, student, distance)
