"""Spatial-channel cosine distances in one read of the features (DESIGN §2.1).

Forward. For teacher T and student S of shape (B, C, H, W), N = H * W, three sums of
products are formed over three index sets:

    dot = sum T*S,   tt = sum T*T,   ss = sum S*S
    over c           (per pixel   b, n)  -> pixel   = 1 - cos   (B, H, W)
    over n           (per channel b, c)  -> channel = 1 - cos   (B, C)
    over c and n     (per sample  b)     -> sample  = 1 - cos   (B,)

with ``cos = dot / (max(sqrt(tt), eps) * max(sqrt(ss), eps))``, eps = 1e-8. The kernels
read T and S once, keep fp32 sums on chip, and write the three distances plus the pixel
sums (B, 3, N) and channel sums (B, 3, C), which backward needs (the sample sums are their
sum over C).

Backward. For one cosine with upstream gradient g, ``nt = max(|t|, eps)``,
``ns = max(|s|, eps)``:

    d(1 - cos)/ds = g * ( -t / (nt ns) + [|s| > eps] cos s / ns^2 )
    d(1 - cos)/dt = g * ( -s / (nt ns) + [|t| > eps] cos t / nt^2 )

(a clamped norm has zero slope, so its term drops). Summing the pixel, channel and sample
contributions, ``dS = a * T + b_s * S`` and ``dT = a * S + b_t * T`` where ``a``, ``b_s``
and ``b_t`` are sums of per-pixel, per-channel and per-sample coefficients computed from
the saved sums. That is one more read of T and S and one write per requested gradient;
the teacher's gradient is only formed when the teacher requires grad (it is frozen in
training).

Backends: ``torch`` (the reference), ``triton`` (``snl_kernels/_triton/cosine_distances.py``)
and ``cuda`` (``csrc/cosine_distances.cu``). Both kernel backends are ``torch.library``
ops with fake implementations and registered autograd, so they work under
``torch.compile(fullgraph=True)``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _triton, checks, dispatch, reference, shared_torch
from ._registration import register_kernel_ops
from .reference import CosineDistances, SpatialChannelLoss

OP = "cosine_distances"
IMPLEMENTED = ("triton", "cuda")
EPS = reference.EPS

_new_tuple = tuple.__new__  # CosineDistances._make without its checks and Python frame

_FWD_SCHEMA = "(Tensor teacher, Tensor student) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
_BWD_SCHEMA = (
    "(Tensor teacher, Tensor student, Tensor pixel_stats, Tensor channel_stats, "
    "Tensor grad_pixel, Tensor grad_channel, Tensor grad_sample, bool teacher_requires_grad)"
    " -> (Tensor, Tensor)"
)


def _triton_kernels():
    return _triton.kernels("cosine_distances")


def _triton_fwd_body(teacher: Tensor, student: Tensor):
    return _triton.kernels("cosine_distances").forward(teacher, student, EPS)


def _triton_bwd_body(teacher, student, pixel_stats, channel_stats, grad_pixel, grad_channel,
                     grad_sample, teacher_requires_grad):
    return _triton_kernels().backward(
        teacher, student, pixel_stats, channel_stats, grad_pixel, grad_channel, grad_sample,
        teacher_requires_grad, EPS,
    )


_triton_fwd = torch.library.custom_op("snl_triton::cosine_distances_fwd", _triton_fwd_body,
                                      mutates_args=(), schema=_FWD_SCHEMA)
_triton_bwd = torch.library.custom_op("snl_triton::cosine_distances_bwd", _triton_bwd_body,
                                      mutates_args=(), schema=_BWD_SCHEMA)


def _fake_fwd(teacher: Tensor, student: Tensor):
    B, C, H, W = teacher.shape
    f32 = dict(dtype=torch.float32)
    return (
        teacher.new_empty((B, H, W), **f32),
        teacher.new_empty((B, C), **f32),
        teacher.new_empty((B,), **f32),
        teacher.new_empty((B, 3, H * W), **f32),
        teacher.new_empty((B, 3, C), **f32),
    )


def _fake_bwd(teacher, student, pixel_stats, channel_stats, grad_pixel, grad_channel,
              grad_sample, teacher_requires_grad):
    grad_teacher = torch.empty_like(teacher) if teacher_requires_grad else teacher.new_empty((0,))
    return grad_teacher, torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    teacher, student = inputs
    ctx.save_for_backward(teacher, student, output[3], output[4])


def _make_backward(bwd_op):
    def backward(ctx, grad_pixel, grad_channel, grad_sample, _grad_pstats, _grad_cstats):
        teacher, student, pixel_stats, channel_stats = ctx.saved_tensors
        B, C, H, W = teacher.shape

        def upstream(g, shape):
            if g is None:
                return teacher.new_zeros(shape, dtype=torch.float32)
            return g.to(torch.float32).contiguous()

        need_teacher = bool(ctx.needs_input_grad[0])
        grad_teacher, grad_student = bwd_op(
            teacher, student, pixel_stats, channel_stats,
            upstream(grad_pixel, (B, H, W)), upstream(grad_channel, (B, C)),
            upstream(grad_sample, (B,)), need_teacher,
        )
        return (grad_teacher if need_teacher else None,
                grad_student if ctx.needs_input_grad[1] else None)

    return backward


_FORWARD_OPS = register_kernel_ops("cosine_distances_fwd", "cosine_distances_bwd", _triton_bwd,
                                   _fake_fwd, _fake_bwd, _make_backward, _setup_context,
                                   (_triton_fwd_body, _triton_bwd_body), differentiable=3)


def cosine_distances(
    teacher: Tensor, student: Tensor, backend: str | None = None
) -> CosineDistances:
    """Pixel, channel and sample cosine distances from one read of the features.

    Args:
        teacher: (B, C, H, W) teacher features, float16/bfloat16/float32/float64, any strides.
        student: (B, C, H, W) student features, same shape, dtype and device.
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        ``CosineDistances(pixel (B, H, W), channel (B, C), sample (B,))``, float32
        (float64 for float64 inputs, which only the reference takes).

    Raises:
        TypeError: a non-tensor or non-floating input.
        ValueError: shapes, dtypes or devices that differ; not 4-D; empty.
        BackendUnavailableError: the requested backend cannot run here (with the reasons).
    """
    checks.check_features(OP, teacher, student)
    why_not = "float64 inputs run on the reference only" if teacher.dtype is torch.float64 else None
    chosen = dispatch.select_backend(OP, backend, (teacher, student), IMPLEMENTED, None, why_not)
    if chosen == "torch":
        if why_not is None and dispatch.requested_backend(backend) is None:
            return shared_torch.cosine_distances(teacher, student)  # automatic, no kernels
        return reference.cosine_distances(teacher, student)
    return _new_tuple(CosineDistances, _FORWARD_OPS[chosen].leading(teacher, student))


def spatial_channel_loss(
    teachers: Sequence[Tensor], students: Sequence[Tensor], backend: str | None = None
) -> SpatialChannelLoss:
    """Spatial-channel distillation terms summed over levels.

    ``pixel_mean = sum_k mean(pixel_k)`` (L_ch), ``channel_mean = sum_k mean(channel_k)``
    (L_sp), ``sample_mean = sum_k mean(sample_k)`` (RD4AD's loss). On Triton, the three
    terms of :func:`snl_kernels.snl_distillation_loss` (its shared path, the same values to
    float rounding); elsewhere :func:`cosine_distances` per level.

    Args:
        teachers: per-level (B, C_k, H_k, W_k) teacher features.
        students: per-level student features matching ``teachers``.
        backend: as for :func:`cosine_distances`.

    Returns:
        ``SpatialChannelLoss(pixel_mean, channel_mean, sample_mean)``, 0-dim tensors.
    """
    checks.check_levels("spatial_channel_loss", teachers, students)
    tensors = (*teachers, *students)
    if _shared_triton(backend, tensors):
        # The three means from the fused loss's Triton path: its host code recorded once
        # per shape and replayed, 3 launches over three levels instead of 9 (host time on
        # this project's CPU ~3x less, bench_host_step).
        from .distillation import snl_distillation_loss

        out = snl_distillation_loss(teachers, students, ("channel", "spatial", "rd"),
                                    backend="triton")
        return SpatialChannelLoss(pixel_mean=out["channel"], channel_mean=out["spatial"],
                                  sample_mean=out["rd"])
    return separate_means(teachers, students, backend)


def _shared_triton(backend: str | None, tensors: Sequence[Tensor]) -> bool:
    """Whether this op runs on Triton (then through the shared path: plain eager, or the
    registered op under ``torch.compile``, tracing and fake tensors)."""
    if any(t.dtype is torch.float64 for t in tensors):
        return False
    return dispatch.select_backend(OP, backend, tensors, IMPLEMENTED) == "triton"


def separate_means(teachers: Sequence[Tensor], students: Sequence[Tensor],
                   backend: str | None) -> SpatialChannelLoss:
    """The three means from :func:`cosine_distances` per level (the specification's
    composition, and every path but the plain-eager Triton one)."""
    terms = [cosine_distances(t, s, backend) for t, s in zip(teachers, students, strict=True)]
    return SpatialChannelLoss(
        pixel_mean=torch.stack([d.pixel.mean() for d in terms]).sum(),
        channel_mean=torch.stack([d.channel.mean() for d in terms]).sum(),
        sample_mean=torch.stack([d.sample.mean() for d in terms]).sum(),
    )
