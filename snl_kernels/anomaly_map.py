"""Anomaly map (DESIGN §2.5): per-level distances, upsampling, sum, blur and image score.

Math. Per level k, ``m_k = 1 - cos over C`` of teacher and student, (B, H_k, W_k). Bilinear
upsampling with ``align_corners=True`` to (H, W) acts on each axis separately as a matrix:
``up(m_k) = U_k^h m_k U_k^w^T`` with U_k^h of shape (H, H_k). The Gaussian blur (radius
``int(4 sigma + 0.5)``, weights normalised to 1, scipy "reflect" borders ``d c b a | a b c
d``) is also separable and linear: ``blur(x) = G^h x G^w^T`` with G^h (H, H), the reflected
taps folded into the matrix. In "add" mode everything is linear, so

    map = G^h (sum_k U_k^h m_k U_k^w^T) G^w^T = sum_k M_k^h m_k M_k^w^T,  M_k = G U_k,

with small precomputed operators M_k^h (H, H_k) and M_k^w (W, W_k): no full-resolution
intermediate exists other than the output, and the features are read once. The score of
an image is the max of its map. "mul" mode multiplies the upsampled maps, which is not
linear: it runs the same per-level distance kernel, then upsamples, multiplies and blurs
with PyTorch ops (slower, still correct).

The operators are built in float64 and cached per (level sizes, output size, sigma,
device). The kernels are inference-only (there is no backward): with inputs that require
grad under grad mode, automatic mode uses the reference and an explicit kernel backend
raises.

Memory plan of the kernels. Distances: one launch per level reads T and S once (any strides,
fp32/fp16/bf16, fp32 sums) and writes ``1 - cos`` into a zero-padded (B, L, HK, WK) float32
buffer, a few MB. Combine: one launch, a block per output tile of one map, forms
``sum_k Mh_k[rows] @ m_k @ Mw_k[cols]^T`` in fp32 FMA (no tf32) with the small operands on
chip, writes the tile and its maximum; the score is the max of the tile maxima (exact, so
deterministic).

Backends: ``torch`` (reference), ``triton`` (``snl_kernels/_triton/anomaly_map.py``) and
``cuda`` (``csrc/anomaly_map.cu``: ``snl::anomaly_map_distances`` and
``snl::anomaly_map_combine``). Both kernel backends are ``torch.library`` custom ops
(``snl_triton::anomaly_map``, ``snl_cuda::anomaly_map``) with fake implementations, and run
the same "mul" path after their distance kernel. ``cuda`` is offered only when the built
extension has these kernels.
"""

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _cuda, _triton, checks, dispatch, reference
from ._registration import KernelOp
from .reference import AnomalyMap

OP = "anomaly_map"
_CUDA_OPS = dispatch.CUDA_OPS[OP]
IMPLEMENTED: tuple[str, ...] = ("triton", "cuda")


def upsample_matrix(n_out: int, n_in: int) -> Tensor:
    """(n_out, n_in) float64 matrix of 1-D linear interpolation with ``align_corners=True``."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, dtype=torch.float64) * scale
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.double()
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat


@functools.lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float) -> Tensor:
    """(n, n) float64 matrix of the 1-D Gaussian blur with scipy "reflect" borders.

    Cached (callers only read it: ``.to()`` to another dtype or device copies).
    """
    if sigma == 0:
        return torch.eye(n, dtype=torch.float64)
    r = reference.gaussian_radius(sigma)
    weights = reference.gaussian_weights(sigma)
    src = reference.reflect_index(n, r)  # source sample of each padded position
    mat = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        mat[i].index_add_(0, src[i : i + 2 * r + 1], weights)
    return mat


@functools.lru_cache(maxsize=32)
def operators(level_sizes: tuple[tuple[int, int], ...], size: tuple[int, int], sigma: float,
              hk: int, wk: int, device: str) -> tuple[Tensor, Tensor]:
    """Stacked blur-and-upsample operators, zero-padded: (L, H, hk) and (L, W, wk) float32."""
    height, width = size
    g_h, g_w = blur_matrix(height, sigma), blur_matrix(width, sigma)
    mh = torch.zeros(len(level_sizes), height, hk, dtype=torch.float64)
    mw = torch.zeros(len(level_sizes), width, wk, dtype=torch.float64)
    for k, (h_k, w_k) in enumerate(level_sizes):
        mh[k, :, :h_k] = g_h @ upsample_matrix(height, h_k)
        mw[k, :, :w_k] = g_w @ upsample_matrix(width, w_k)
    return mh.to(device, torch.float32), mw.to(device, torch.float32)


_SCHEMA = (
    "(Tensor[] teachers, Tensor[] students, int[] size, float sigma, str mode) -> (Tensor, Tensor)"
)


def _kernel_anomaly_map(distances, combine, teachers, students, size, sigma, mode):
    """The body of both kernel ops: ``distances`` gives the padded (B, L, HK, WK) buffer,
    ``combine(m, mh, mw, H, W)`` the add-mode maps and scores."""
    size = tuple(size)
    m = distances(list(teachers), list(students))
    level_sizes = tuple((t.shape[2], t.shape[3]) for t in teachers)
    if mode == "add":
        mh, mw = operators(level_sizes, size, sigma, m.shape[2], m.shape[3], str(m.device))
        return combine(m, mh, mw, *size)
    product = None
    for k, (h_k, w_k) in enumerate(level_sizes):
        up = torch.nn.functional.interpolate(m[:, k : k + 1, :h_k, :w_k], size=size,
                                             mode="bilinear", align_corners=True)
        product = up if product is None else product * up
    assert product is not None
    g_h = blur_matrix(size[0], sigma).to(m.device, torch.float32)
    g_w = blur_matrix(size[1], sigma).to(m.device, torch.float32)
    maps = g_h @ product @ g_w.T
    return maps, maps.amax(dim=(1, 2, 3))


def _triton_anomaly_map(teachers, students, size, sigma, mode):
    kernels = _triton.kernels("anomaly_map")
    return _kernel_anomaly_map(
        lambda ts, ss: kernels.pixel_distances(ts, ss, reference.EPS), kernels.combine,
        teachers, students, size, sigma, mode)


def _cuda_distances(teachers: list[Tensor], students: list[Tensor]) -> Tensor:
    hk = max(t.shape[2] for t in teachers)
    wk = max(t.shape[3] for t in teachers)
    return torch.ops.snl.anomaly_map_distances(teachers, students, hk, wk)


def _cuda_anomaly_map(teachers, students, size, sigma, mode):
    return _kernel_anomaly_map(_cuda_distances, torch.ops.snl.anomaly_map_combine,
                               teachers, students, size, sigma, mode)


# Inference only (no autograd): the eager path is the op's body itself (_registration).
torch.library.custom_op("snl_triton::anomaly_map", _triton_anomaly_map, mutates_args=(),
                        schema=_SCHEMA)
torch.library.custom_op("snl_cuda::anomaly_map", _cuda_anomaly_map, mutates_args=(),
                        schema=_SCHEMA)


def _fake_anomaly_map(teachers, students, size, sigma, mode):
    t = teachers[0]
    return (t.new_empty((t.shape[0], 1, size[0], size[1]), dtype=torch.float32),
            t.new_empty((t.shape[0],), dtype=torch.float32))


torch.library.register_fake("snl_triton::anomaly_map")(_fake_anomaly_map)
torch.library.register_fake("snl_cuda::anomaly_map")(_fake_anomaly_map)

if all(_cuda.has_op(op) for op in _CUDA_OPS):

    @torch.library.register_fake("snl::anomaly_map_distances")
    def _fake_distances(teachers, students, hk, wk):
        t = teachers[0]
        return t.new_empty((t.shape[0], len(teachers), hk, wk), dtype=torch.float32)

    @torch.library.register_fake("snl::anomaly_map_combine")
    def _fake_combine(m, mh, mw, height, width):
        return (m.new_empty((m.shape[0], 1, height, width)), m.new_empty((m.shape[0],)))


_KERNEL_OPS = {"triton": KernelOp(torch.ops.snl_triton.anomaly_map, _triton_anomaly_map),
               "cuda": KernelOp(torch.ops.snl_cuda.anomaly_map, _cuda_anomaly_map)}


def anomaly_map(teachers: Sequence[Tensor], students: Sequence[Tensor],
                size: int | tuple[int, int], sigma: float = 4.0, mode: str = "add",
                backend: str | None = None) -> AnomalyMap:
    """Anomaly maps (B, 1, H, W) and image scores (B,) from per-level features.

    Args:
        teachers: per-level (B, C_k, H_k, W_k) teacher features (any number of levels).
        students: per-level student features matching ``teachers``.
        size: output size, an int or (H, W).
        sigma: Gaussian blur sigma in output pixels (0: no blur).
        mode: "add" or "mul".
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        ``AnomalyMap(maps (B, 1, H, W), scores (B,))``, float32 (float64 for float64 inputs,
        which only the reference takes).

    Raises:
        TypeError, ValueError: bad features, size, sigma or mode (the message names which).
        BackendUnavailableError: the requested backend cannot run here (with the reasons).
    """
    checks.check_levels(OP, teachers, students)
    out_size = checks.check_size(OP, size)
    sigma = checks.check_sigma(OP, sigma)
    checks.check_choice(OP, "mode", mode, ("add", "mul"))
    tensors = [*teachers, *students]
    why_not = None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        why_not = "the inputs require grad and the anomaly-map kernels are inference-only"
    elif teachers[0].dtype == torch.float64:
        why_not = "float64 inputs run on the reference only"
    chosen = dispatch.select_backend(OP, backend, tensors, IMPLEMENTED, why_not=why_not)
    if chosen == "torch":
        return reference.anomaly_map(teachers, students, out_size, sigma, mode)
    maps, scores = _KERNEL_OPS[chosen](list(teachers), list(students), list(out_size), sigma, mode)
    return AnomalyMap(maps, scores)
