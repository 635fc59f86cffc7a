"""Plain-PyTorch reference of every op: the specification of the library in code.

Each function here is the CPU fallback (``backend="torch"``), the oracle the kernels are
tested against, and the "eager" baseline of the benchmarks. They are written for clarity,
not speed: nothing is fused, and the affinity losses materialise their N x N and
C_a x C_b matrices, as a user would write them.

The SNL paper (Deng & Li, arXiv 2402.17091) does not publish its full equations. The
formulation below is the one fixed by this project's specification (``docs/DESIGN.md``), close
to the paper's abstract and to RD4AD's code.

Conventions:
    - Features are (B, C, H, W); N = H * W. ``eps = 1e-8`` clamps each norm separately,
      ``cos(x, y) = <x, y> / (max(|x|, eps) * max(|y|, eps))``, as
      ``torch.nn.functional.cosine_similarity`` does.
    - Inputs may be float16, bfloat16, float32 or float64. Work and outputs are float32,
      except that float64 inputs stay float64 (so the tests have an exact oracle).
    - Clamped norms come from :func:`clamped_norm`: ``torch.linalg.vector_norm`` on GPUs,
      ``sqrt(max(sum of squares, eps^2))`` on the CPU (PyTorch's CPU ``vector_norm`` over a
      strided dimension, such as the channels of a (B, C, H, W) tensor, is about 100x slower
      than the square and the sum). Both are ``max(|x|, eps)`` with a gradient of 0 wherever
      the clamp holds, so zero vectors give finite values and gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks

EPS = 1e-8
_F = TypeVar("_F", bound=Callable)


def _device_type(args: Sequence[object]) -> str:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            return a[0].device.type
    return "cpu"


def full_precision(fn: _F) -> _F:
    """Run ``fn`` with autocast off: the reference computes in float32 (or float64) even
    inside ``torch.autocast``, which would otherwise recast its matmuls and convolutions."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = _device_type(args)
        if device_type not in ("cpu", "cuda"):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class CosineDistances(NamedTuple):
    """The three spatial-channel distances of one level."""

    pixel: Tensor  #: (B, H, W): 1 - cos over C at each pixel
    channel: Tensor  #: (B, C): 1 - cos over H*W of each channel map
    sample: Tensor  #: (B,): 1 - cos over C*H*W of the whole sample (RD4AD's loss)


class SpatialChannelLoss(NamedTuple):
    """Spatial-channel distillation terms summed over levels (0-dim tensors), each named for
    the distances it averages (the fields of :class:`CosineDistances`)."""

    pixel_mean: Tensor  #: sum_k mean(pixel_k): channel distillation, "L_ch"
    channel_mean: Tensor  #: sum_k mean(channel_k): spatial distillation, "L_sp"
    sample_mean: Tensor  #: sum_k mean(sample_k): RD4AD's loss


class CramOutput(NamedTuple):
    """Outputs of central residual aggregation."""

    central: Tensor  #: (B, D, h, w): mu_i = sum_k a_ik c_k
    assign: Tensor  #: (B, K, h, w): soft assignment a_ik
    compact: Tensor  #: (B, h, w): sum_k a_ik |e_i - c_k|^2


class AnomalyMap(NamedTuple):
    """Anomaly maps and image scores."""

    maps: Tensor  #: (B, 1, H, W)
    scores: Tensor  #: (B,): max of each map


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def clamped_norm(x: Tensor, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:
    """``max(|x|_dim, eps)``, its gradient 0 where the clamp holds (zero vectors included)."""
    if x.device.type == "cpu":
        return x.square().sum(dim, keepdim=keepdim).clamp_min(EPS * EPS).sqrt()
    return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim).clamp_min(EPS)


def _cosine_distance(a: Tensor, b: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    dot = (a * b).sum(dim)
    return 1.0 - dot / (clamped_norm(a, dim) * clamped_norm(b, dim))


# --------------------------------------------------------------------------- 2.1 cosines


@full_precision
def cosine_distances(teacher: Tensor, student: Tensor) -> CosineDistances:
    """Pixel, channel and sample cosine distances between teacher and student features.

    Args:
        teacher: (B, C, H, W) teacher features.
        student: (B, C, H, W) student features, same shape, dtype and device.

    Returns:
        ``CosineDistances(pixel (B, H, W), channel (B, C), sample (B,))``.
    """
    checks.check_features("cosine_distances", teacher, student)
    dt = compute_dtype(teacher)
    t, s = teacher.to(dt), student.to(dt)
    return CosineDistances(
        pixel=_cosine_distance(t, s, 1),
        channel=_cosine_distance(t, s, (2, 3)),
        sample=_cosine_distance(t, s, (1, 2, 3)),
    )


@full_precision
def spatial_channel_loss(
    teachers: Sequence[Tensor], students: Sequence[Tensor]
) -> SpatialChannelLoss:
    """Sum over levels of ``mean(pixel)``, ``mean(channel)`` and ``mean(sample)``.

    Args:
        teachers: per-level (B, C_k, H_k, W_k) teacher features.
        students: per-level student features, matching ``teachers``.

    Returns:
        ``SpatialChannelLoss(pixel_mean, channel_mean, sample_mean)``, each a 0-dim tensor.
    """
    checks.check_levels("spatial_channel_loss", teachers, students)
    terms = [cosine_distances(t, s) for t, s in zip(teachers, students, strict=True)]
    return SpatialChannelLoss(
        pixel_mean=sum(d.pixel.mean() for d in terms),  # type: ignore[arg-type]
        channel_mean=sum(d.channel.mean() for d in terms),  # type: ignore[arg-type]
        sample_mean=sum(d.sample.mean() for d in terms),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- 2.2 / 2.3 affinity


def _reduce(diff: Tensor, distance: str) -> Tensor:
    return diff.square().mean() if distance == "l2" else diff.abs().mean()


@full_precision
def intra_affinity_loss(teacher: Tensor, student: Tensor, distance: str = "l2") -> Tensor:
    """Distance between the pixel-to-pixel cosine affinities of teacher and student.

    ``X = F / max(|F|_C, eps)`` per pixel (B, C, N), ``A = X^T X`` (B, N, N); the loss is
    ``mean (A_T - A_S)^2`` ("l2") or ``mean |A_T - A_S|`` ("l1") over b, i, j. This
    reference materialises both N x N matrices.

    Args:
        teacher: (B, C, H, W) teacher features.
        student: (B, C, H, W) student features.
        distance: "l2" or "l1".

    Returns:
        0-dim loss tensor.
    """
    op = "intra_affinity_loss"
    checks.check_features(op, teacher, student)
    checks.check_choice(op, "distance", distance, ("l2", "l1"))
    dt = compute_dtype(teacher)

    def affinity(f: Tensor) -> Tensor:
        x = f.to(dt).flatten(2)
        x = x / clamped_norm(x, 1, keepdim=True)
        return x.transpose(1, 2) @ x

    return _reduce(affinity(teacher) - affinity(student), distance)


@full_precision
def inter_affinity_loss(
    teacher_a: Tensor,
    teacher_b: Tensor,
    student_a: Tensor,
    student_b: Tensor,
    distance: str = "l2",
) -> Tensor:
    """Distance between the cross-level channel affinities of teacher and student.

    For a finer level a and a coarser level b: ``P = avg_pool(F_a to F_b's H, W)``,
    ``Q = F_b``; each channel's spatial vector is normalised (``max(|.|_N, eps)``) and
    ``G = P^ Q^^T`` (B, C_a, C_b). The loss is ``mean (G_T - G_S)^2`` ("l2") or
    ``mean |G_T - G_S|`` ("l1").

    Args:
        teacher_a: (B, C_a, H_a, W_a) teacher features of the finer level.
        teacher_b: (B, C_b, H_b, W_b) teacher features of the coarser level.
        student_a: student features matching ``teacher_a``.
        student_b: student features matching ``teacher_b``.
        distance: "l2" or "l1".

    Returns:
        0-dim loss tensor.
    """
    checks.check_inter("inter_affinity_loss", teacher_a, teacher_b, student_a, student_b, distance)
    h_b, w_b = teacher_b.shape[-2:]
    dt = compute_dtype(teacher_a)

    def channel_affinity(f_a: Tensor, f_b: Tensor) -> Tensor:
        p = F.adaptive_avg_pool2d(f_a.to(dt), (h_b, w_b)).flatten(2)
        q = f_b.to(dt).flatten(2)
        p = p / clamped_norm(p, 2, keepdim=True)
        q = q / clamped_norm(q, 2, keepdim=True)
        return p @ q.transpose(1, 2)

    diff = channel_affinity(teacher_a, teacher_b) - channel_affinity(student_a, student_b)
    return _reduce(diff, distance)


# --------------------------------------------------------------------------- 2.4 CRAM


@full_precision
def cram(embedding: Tensor, centers: Tensor, log_tau: Tensor | float) -> CramOutput:
    """Central residual aggregation: soft assignment of each position to learned centres.

    With ``e_i`` the D-vector at position i and ``tau = exp(log_tau)``:
    ``d_ik = |e_i|^2 - 2 e_i.c_k + |c_k|^2``, ``a_ik = softmax_k(-d_ik / tau)``,
    ``mu_i = sum_k a_ik c_k``, ``compact_i = sum_k a_ik d_ik``.

    Args:
        embedding: (B, D, h, w) bottleneck embedding.
        centers: (K, D) centres.
        log_tau: log of the softmax temperature, a float or a 0-dim tensor.

    Returns:
        ``CramOutput(central (B, D, h, w), assign (B, K, h, w), compact (B, h, w))``.
    """
    checks.check_cram("cram", embedding, centers, log_tau)
    dt = compute_dtype(embedding)
    b, d, h, w = embedding.shape
    e = embedding.to(dt).flatten(2).transpose(1, 2)  # (B, N, D)
    c = centers.to(dt)
    if isinstance(log_tau, Tensor):
        tau = log_tau.to(device=embedding.device, dtype=dt).reshape(()).exp()
    else:
        tau = torch.tensor(math.exp(log_tau), device=embedding.device, dtype=dt)
    dist = e.square().sum(-1, keepdim=True) - 2.0 * (e @ c.T) + c.square().sum(-1)  # (B, N, K)
    assign = torch.softmax(-dist / tau, dim=-1)
    central = assign @ c  # (B, N, D)
    compact = (assign * dist).sum(-1)
    # Contiguous (B, D, h, w), as the kernels return them: a channels-last view here would
    # carry its layout into the decoder (on the CPU, batch norm over channels-last tensors
    # is several times slower).
    return CramOutput(
        central=central.transpose(1, 2).reshape(b, d, h, w).contiguous(),
        assign=assign.transpose(1, 2).reshape(b, -1, h, w).contiguous(),
        compact=compact.reshape(b, h, w),
    )


# --------------------------------------------------------------------------- 2.5 anomaly map


def gaussian_radius(sigma: float) -> int:
    """Radius of the blur kernel, as ``scipy.ndimage.gaussian_filter(truncate=4.0)``."""
    return int(4.0 * sigma + 0.5)


def gaussian_weights(sigma: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised 1-D Gaussian weights of length ``2 * radius + 1``."""
    r = gaussian_radius(sigma)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(dtype)


def reflect_index(n: int, radius: int) -> Tensor:
    """Source index of each sample of a length-n axis padded by ``radius`` on both sides.

    scipy's "reflect" border repeats the edge sample (``d c b a | a b c d | d c b a``) and
    continues with period 2n, so it is defined for any radius, also beyond n.
    """
    i = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps with scipy's "reflect" borders."""
    if sigma == 0:
        return x
    r = gaussian_radius(sigma)
    g = gaussian_weights(sigma, x.dtype).to(x.device)
    h, w = x.shape[-2:]
    x = x.index_select(2, reflect_index(h, r).to(x.device))
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    x = x.index_select(3, reflect_index(w, r).to(x.device))
    return F.conv2d(x, g.view(1, 1, 1, -1))


@full_precision
def anomaly_map(
    teachers: Sequence[Tensor],
    students: Sequence[Tensor],
    size: int | tuple[int, int],
    sigma: float = 4.0,
    mode: str = "add",
) -> AnomalyMap:
    """Anomaly maps from per-level cosine distances, upsampled, combined and blurred.

    Per level ``m_k = 1 - cos over C`` (B, H_k, W_k), bilinearly upsampled with
    ``align_corners=True`` to ``size``; summed ("add") or multiplied ("mul") over levels;
    blurred by a Gaussian of ``sigma`` (radius ``int(4 sigma + 0.5)``, scipy "reflect"
    borders, ``sigma=0`` for none). The score of an image is the max of its map.

    Args:
        teachers: per-level (B, C_k, H_k, W_k) teacher features.
        students: per-level student features, matching ``teachers``.
        size: output size, an int or (H, W).
        sigma: standard deviation of the blur in output pixels.
        mode: "add" or "mul".

    Returns:
        ``AnomalyMap(maps (B, 1, H, W), scores (B,))``.
    """
    op = "anomaly_map"
    checks.check_levels(op, teachers, students)
    out_size = checks.check_size(op, size)
    sigma = checks.check_sigma(op, sigma)
    checks.check_choice(op, "mode", mode, ("add", "mul"))
    total: Tensor | None = None
    for t, s in zip(teachers, students, strict=True):
        dt = compute_dtype(t)
        m = _cosine_distance(t.to(dt), s.to(dt), 1).unsqueeze(1)
        m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=True)
        if total is None:
            total = m
        else:
            total = total + m if mode == "add" else total * m
    assert total is not None
    maps = gaussian_blur(total, sigma)
    return AnomalyMap(maps=maps, scores=maps.amax(dim=(1, 2, 3)))
