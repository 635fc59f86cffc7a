"""SNL's distillation terms in PyTorch, sharing per level what the separate ops recompute.

Automatic mode runs this for :func:`snl_kernels.snl_distillation_loss` and
:func:`snl_kernels.cosine_distances` where no kernel backend can (CPU tensors, or a GPU
without kernels) and the inputs are not float64; asking for ``backend="torch"`` (or
``SNL_BACKEND=torch``) gets the reference ops, which stay the specification, and tests hold
this path to them. It is the Triton shared path's plan in
plain PyTorch (autograd differentiates it), per level with ``t``, ``s`` the (B, C, N)
features:

- the products ``t*t``, ``s*s`` and ``t*s`` are formed once; their sums over the channels
  (per pixel) and over the pixels (per channel) give the pixel and channel distances, and
  the per-pixel sums summed give the sample distance (the reference forms each product again
  for each of the three distances, 9 products a level instead of 3);
- the intra-affinity term normalises with those per-pixel norms, and takes the Gram form of
  :mod:`snl_kernels.gram_path` where it applies (l2, C < N), the N x N matrices elsewhere;
- the inter-affinity term normalises the coarser level's channels with the per-channel norms;
  the finer level is pooled once per pair (``avg_pool2d`` where the sizes divide: the same
  bins as ``adaptive_avg_pool2d``);
- only what the requested terms need is formed (the sample term alone takes three dot
  products a level).

The sums are the reference's quantities summed in another order: the two paths agree to float
rounding, not bit for bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gram_path
from .reference import EPS, CosineDistances, compute_dtype, full_precision


def applies(tensors: Sequence[Tensor]) -> bool:
    """Whether automatic mode without kernels takes this path (not for float64 inputs)."""
    return all(t.dtype != torch.float64 for t in tensors)


def _norm(square_sum: Tensor) -> Tensor:
    """``max(sqrt(square_sum), eps)``; gradient 0 where the clamp holds (as the reference's)."""
    return square_sum.clamp_min(EPS * EPS).sqrt()


def _distance(dot: Tensor, tt: Tensor, ss: Tensor) -> Tensor:
    return 1.0 - dot / (_norm(tt) * _norm(ss))


def _reduce(diff: Tensor, distance: str) -> Tensor:
    return diff.square().mean() if distance == "l2" else diff.abs().mean()


class _Level:
    """One level's (B, C, N) features and the sums formed from them on first use."""

    def __init__(self, teacher: Tensor, student: Tensor):
        dt = compute_dtype(teacher)
        self.shape = teacher.shape
        self.t, self.s = teacher.to(dt).flatten(2), student.to(dt).flatten(2)
        self._products: tuple[Tensor, Tensor, Tensor] | None = None
        self._pixel: tuple[Tensor, Tensor, Tensor] | None = None
        self._channel: tuple[Tensor, Tensor, Tensor] | None = None

    def products(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._products is None:
            self._products = (self.t * self.t, self.s * self.s, self.t * self.s)
        return self._products

    def pixel_sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per pixel (B, N): sum over C of t*t, s*s, t*s."""
        if self._pixel is None:
            self._pixel = tuple(p.sum(1) for p in self.products())  # type: ignore[assignment]
        return self._pixel  # type: ignore[return-value]

    def channel_sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per channel (B, C): sum over N of t*t, s*s, t*s."""
        if self._channel is None:
            self._channel = tuple(p.sum(2) for p in self.products())  # type: ignore[assignment]
        return self._channel  # type: ignore[return-value]

    def sample_distance(self) -> Tensor:
        if self._channel is not None and self._pixel is None:
            tt, ss, ts = (p.sum(1) for p in self._channel)
        elif self._products is not None:
            tt, ss, ts = (p.sum(1) for p in self.pixel_sums())
        else:  # the sample term alone: three dot products, no feature-sized product kept
            t, s = self.t.flatten(1), self.s.flatten(1)
            tt, ss, ts = (torch.linalg.vecdot(a, b) for a, b in ((t, t), (s, s), (t, s)))
        return _distance(ts, tt, ss)

    def intra(self, distance: str) -> Tensor:
        tt, ss, _ = self.pixel_sums()
        x_t = self.t / _norm(tt).unsqueeze(1)
        x_s = self.s / _norm(ss).unsqueeze(1)
        b, _, n = self.t.shape
        if gram_path.applies(self.t.view(self.shape), distance):
            return gram_path.gram_total(x_s, x_t) / (b * n * n)
        diff = x_t.transpose(1, 2) @ x_t - x_s.transpose(1, 2) @ x_s
        return _reduce(diff, distance)


@full_precision
def cosine_distances(teacher: Tensor, student: Tensor) -> CosineDistances:
    """The pixel, channel and sample distances from one set of products (inputs checked by
    the caller): :func:`snl_kernels.reference.cosine_distances` summed in another order."""
    lv = _Level(teacher, student)
    b, _, h, w = teacher.shape
    tt, ss, ts = lv.pixel_sums()
    return CosineDistances(pixel=_distance(ts, tt, ss).view(b, h, w),
                           channel=_distance(*(lv.channel_sums()[i] for i in (2, 0, 1))),
                           sample=lv.sample_distance())


def _pooled(level: _Level, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The level's teacher and student pooled to ``size``, each channel normalised."""
    b, c, h, w = level.shape
    out = []
    for f in (level.t, level.s):
        f = f.view(b, c, h, w)
        if h % size[0] == 0 and w % size[1] == 0:  # the same bins, about 1.5x faster on a CPU
            p = F.avg_pool2d(f, (h // size[0], w // size[1])).flatten(2)
        else:
            p = F.adaptive_avg_pool2d(f, size).flatten(2)
        out.append(p / _norm(p.square().sum(2)).unsqueeze(2))
    return out[0], out[1]


@full_precision
def distillation_terms(teachers: Sequence[Tensor], students: Sequence[Tensor],
                       terms: Sequence[str], intra_distance: str,
                       inter_distance: str) -> dict[str, Tensor]:
    """The requested terms (see the module doc); inputs checked by the caller.

    Returns:
        ``{term: 0-dim float32 tensor}`` in the order of ``terms``.
    """
    levels = [_Level(t, s) for t, s in zip(teachers, students, strict=True)]
    out: dict[str, Tensor] = {}
    if "channel" in terms:  # L_ch: the per-pixel distances
        out["channel"] = sum(_distance(ts, tt, ss).mean()  # type: ignore[assignment]
                             for tt, ss, ts in (lv.pixel_sums() for lv in levels))
    if "spatial" in terms:  # L_sp: the per-channel distances
        out["spatial"] = sum(_distance(ts, tt, ss).mean()  # type: ignore[assignment]
                             for tt, ss, ts in (lv.channel_sums() for lv in levels))
    if "rd" in terms:
        out["rd"] = sum(lv.sample_distance().mean() for lv in levels)  # type: ignore[assignment]
    if "intra" in terms:
        out["intra"] = torch.stack([lv.intra(intra_distance) for lv in levels]).sum()
    if "inter" in terms:
        values = []
        for a, b in itertools.pairwise(levels):
            p_t, p_s = _pooled(a, b.shape[-2:])
            tt, ss, _ = b.channel_sums()
            q_t = b.t / _norm(tt).unsqueeze(2)
            q_s = b.s / _norm(ss).unsqueeze(2)
            values.append(_reduce(p_t @ q_t.transpose(1, 2) - p_s @ q_s.transpose(1, 2),
                                  inter_distance))
        out["inter"] = torch.stack(values).sum()
    return {term: out[term] for term in terms}
