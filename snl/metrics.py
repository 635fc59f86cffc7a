"""Anomaly detection metrics: image and pixel AUROC, AUPRO up to an FPR limit, F1-max.

Every metric is exact, ties included, and computed from one sort of the samples, never by
looping over thresholds. A threshold ``t`` predicts "anomalous" for every score
``s >= t``; the candidate thresholds are the distinct score values. After the sort the
samples fall into G groups of equal score; per group, the numbers of normal and anomalous
samples below and within it (``neg_below``, ``neg_in``, ``pos_below``, ``pos_in``) give
every metric with a few vectorised passes. ``P`` anomalous and ``N`` normal samples.

AUROC
    The area under the ROC curve through every distinct threshold (trapezoids, as
    ``sklearn.metrics.roc_auc_score``) is the Mann-Whitney statistic
    ``sum_p (#{n: s_n < s_p} + #{n: s_n == s_p} / 2) / (P N)``
    ``= sum_groups pos_in (neg_below + neg_in / 2) / (P N)``.

F1-max
    ``F1(t) = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)``. Raising ``t`` up to the
    next anomalous score keeps ``TP`` and cannot raise ``FP``, so the maximum is reached
    at the score of a group holding anomalous samples, where ``TP = P - pos_below`` and
    ``FP = N - neg_below``.

AUPRO (MVTec AD's definition, Bergmann et al., IJCV 2021, and their evaluation code)
    Ground-truth regions are the connected components of each mask with 8-connectivity
    (``scipy.ndimage.label`` with a 3x3 structure of ones, as in MVTec's
    ``pro_curve_util.py``), never joined across images; ``K`` regions in all. For a
    threshold ``t``: ``PRO(t) = 1/K sum_k |{p in k: s_p >= t}| / |k|``, and ``FPR(t)`` is
    the fraction of normal pixels (outside every region, over all images) with
    ``s >= t``. The curve runs through ``(0, 0)`` and the point of every distinct
    threshold; its area from FPR 0 to ``fpr_limit`` (trapezoids; the segment crossing the
    limit is cut at the PRO interpolated linearly there) is divided by ``fpr_limit``.

    Each defect pixel adds ``w_p = 1 / (K |k(p)|)`` to PRO once ``t <= s_p``. Walking
    the groups from the top score ``u_1`` down, group ``j`` moves ``FPR`` from ``f_{j-1}``
    to ``f_j`` and ``PRO`` from ``A_j = sum w_p [s_p > u_j]`` to
    ``B_j = sum w_p [s_p >= u_j]``; the area is ``sum_j (f_j - f_{j-1}) (A_j + B_j) / 2``,
    with ``A``, ``B`` read from the cumulative sum of ``w`` over the defect pixels in
    descending order (MVTec's own ``cumsum``). Only the groups down to the limit are
    walked. With ``fpr_limit=1`` AUPRO is a region-weighted pixel AUROC.

Speed: float32 scores and their tags (0 normal, else the label or region id) are packed
into one uint64 key, ``order-preserving bits(score) << 32 | tag``, and sorted by value:
the cost of a plain sort, several times less than an argsort, and within a group of equal
scores the normal samples come first. For 2,000 maps of 256x256 (131 M pixels) the sort
takes about 4 s on one core and the whole :func:`evaluate` about 10 s, whatever the share
of defect pixels; peak extra memory is about 30 bytes per pixel. Other dtypes use
``np.lexsort`` (exact, slower). Scores are compared in their own precision: float64 stays
float64, other floats become float32 (exact for float16 and bfloat16), integers float64.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

#: Keys of :func:`evaluate`'s result, in table order.
METRICS = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro")

# MVTec's structuring element: 8-connectivity within an image, none across images.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:
        raise TypeError(f"{name} must be a tensor or an array, got {type(x).__name__}") from exc


def _scores(x: ArrayLike, name: str) -> np.ndarray:
    a = _as_numpy(x, name)
    if a.dtype == np.float64:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
    elif np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        a = a.astype(np.float64)
    else:
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _positive(x: ArrayLike, name: str) -> np.ndarray:
    a = _as_numpy(x, name)
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{name} must be bool or numeric, got dtype {a.dtype}")
    return a > 0.5


def _squeeze_channel(a: np.ndarray) -> np.ndarray:
    return a[:, 0] if a.ndim == 4 and a.shape[1] == 1 else a


def _image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores, "scores").reshape(-1)
    y = _positive(labels, "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    return s, y


def _pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m = _squeeze_channel(_scores(maps, "maps"))
    g = _squeeze_channel(_positive(masks, "masks"))
    if m.ndim == 2 and g.ndim == 2:
        m, g = m[None], g[None]
    if m.ndim != 3 or m.shape != g.shape:
        raise ValueError(
            f"maps and masks must both be (B, H, W) or (B, 1, H, W) of the same shape, got "
            f"maps {tuple(_as_numpy(maps, 'maps').shape)} and masks "
            f"{tuple(_as_numpy(masks, 'masks').shape)}")
    return m, g


def _sortable_uint32(values: np.ndarray, out: np.ndarray) -> None:
    """float32 -> uint32 of the same order (IEEE bits, sign flipped; -0.0 made +0.0)."""
    bits = values.view(np.uint32)
    np.right_shift(bits, np.uint32(31), out=out)
    out *= np.uint32(0x7FFFFFFF)  # negatives: flip every bit; positives: only the sign
    out |= np.uint32(0x80000000)
    out ^= bits
    out[out == np.uint32(0x7FFFFFFF)] = np.uint32(0x80000000)


def _float_from_sortable(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


class _Ranked:
    """Samples sorted by score once, in groups of equal score.

    ``tags`` marks each sample: 0 normal, anything else anomalous (a region id for pixels).
    float32 scores and their tags are packed into one uint64 key, ``order(score) << 32 |
    tag``, and sorted by value, several times faster than an argsort; other dtypes go
    through ``np.lexsort``. Either way, within a group of equal scores the normal samples
    come first, so a group holds anomalous samples exactly when its last one is.

    Kept: ``end`` (G,) the last index of each group in ascending order, the score and tag
    there, ``pos_upto`` (G,) the anomalous samples up to that index, and the tags of the
    anomalous samples in descending score order. Counts of any groups follow from these.
    """

    def __init__(self, scores: np.ndarray, tags: np.ndarray, what: str) -> None:
        n = scores.size
        n_pos = int(np.count_nonzero(tags))
        if n_pos == 0 or n_pos == n:
            kind = "anomalous" if n_pos else "normal"
            raise ValueError(
                f"{what}: all {n} are {kind}; AUROC, F1-max and AUPRO need both normal and "
                "anomalous ones")
        self.n, self.n_pos, self.n_neg = n, n_pos, n - n_pos
        self.packed = scores.dtype == np.float32 and tags.dtype.itemsize <= 4
        if self.packed:
            key = np.empty(n, dtype=np.uint64)
            words = key.view(np.uint32)
            high = 1 if sys.byteorder == "little" else 0
            _sortable_uint32(scores, out=words[high::2])
            words[1 - high::2] = tags
            key.sort()
            value, tag = words[high::2], words[1 - high::2]
        else:
            key = None
            order = np.lexsort((tags, scores))
            value, tag = scores[order], tags[order]
        last = np.empty(n, dtype=bool)
        np.not_equal(value[1:], value[:-1], out=last[:-1])
        last[-1] = True
        self.end = np.flatnonzero(last)  # (G,)
        del last
        self.value_at_end = value[self.end]
        self.tag_at_end = tag[self.end]
        is_pos = tag != 0
        self.pos_tags_desc = tag[is_pos][::-1]
        del value, tag
        count_dtype = np.int32 if n < 2**31 else np.int64
        # The sorted keys are no longer needed: their memory takes the running count
        # (a fresh n-sized buffer costs seconds of page faults at 10^8 pixels).
        out = key.view(count_dtype)[:n] if key is not None else None
        self.pos_upto = np.cumsum(is_pos, dtype=count_dtype, out=out)[self.end]

    def _counts(self, groups: np.ndarray) -> tuple[np.ndarray, ...]:
        """(pos_below, neg_below, pos_in, neg_in) of the given groups, as int64."""
        has_prev = groups > 0
        end_prev = np.where(has_prev, self.end[groups - 1], -1)
        pos_below = np.where(has_prev, self.pos_upto[groups - 1], 0).astype(np.int64)
        pos_in = self.pos_upto[groups].astype(np.int64) - pos_below
        neg_in = (self.end[groups] - end_prev) - pos_in
        return pos_below, end_prev + 1 - pos_below, pos_in, neg_in

    def _groups_with_positives(self) -> np.ndarray:
        return np.flatnonzero(self.tag_at_end != 0)

    def threshold(self, group: int) -> float:
        value = self.value_at_end[group]
        return _float_from_sortable(int(value)) if self.packed else float(value)

    def auroc(self) -> float:
        _, neg_below, pos_in, neg_in = self._counts(self._groups_with_positives())
        twice_u = 2 * int(np.dot(pos_in, neg_below)) + int(np.dot(pos_in, neg_in))
        return twice_u / (2 * self.n_pos * self.n_neg)

    def f1_max(self) -> tuple[float, float]:
        groups = self._groups_with_positives()
        pos_below, neg_below, _, _ = self._counts(groups)
        tp = (self.n_pos - pos_below).astype(np.float64)  # score >= the group's score
        fp = (self.n_neg - neg_below).astype(np.float64)
        f1 = 2.0 * tp / (tp + fp + self.n_pos)
        best = int(np.argmax(f1))
        return float(f1[best]), self.threshold(int(groups[best]))

    def _pro_walk(self, fpr_limit: float, weight_of_tag: np.ndarray):
        """(fpr, fpr_prev, a, b) of each group walked from the top score down to the limit."""
        n_neg = self.n_neg
        # Walk the groups in descending order down to the one holding the n_top-th highest
        # normal score (one more than the limit needs, against float rounding).
        n_top = min(n_neg, math.ceil(fpr_limit * n_neg) + 1)
        neg_upto = lambda g: int(self.end[g]) + 1 - int(self.pos_upto[g])
        first = bisect.bisect_right(range(self.end.size), n_neg - n_top, key=neg_upto)
        groups = np.arange(self.end.size - 1, first - 1, -1)
        pos_below, neg_below, pos_in, neg_in = self._counts(groups)
        fpr = (n_neg - neg_below) / n_neg  # normal scores >= u_j
        fpr_prev = (n_neg - neg_below - neg_in) / n_neg  # normal scores > u_j
        # PRO summed over defect pixels in descending order, as MVTec's cumsum.
        pro = np.concatenate(([0.0], np.cumsum(weight_of_tag[self.pos_tags_desc])))
        b = pro[self.n_pos - pos_below]  # PRO(score >= u_j)
        a = pro[self.n_pos - pos_below - pos_in]  # PRO(score > u_j)
        return fpr, fpr_prev, a, b

    def aupro(self, fpr_limit: float, weight_of_tag: np.ndarray) -> float:
        fpr, fpr_prev, a, b = self._pro_walk(fpr_limit, weight_of_tag)
        inside = fpr <= fpr_limit
        area = float(np.sum((fpr[inside] - fpr_prev[inside]) * (a[inside] + b[inside]) / 2))
        j = int(np.count_nonzero(inside))  # FPR rises along the walk: first group past it
        if j < fpr.size:
            x0, x1 = fpr_prev[j], fpr[j]
            y_limit = a[j] + (b[j] - a[j]) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (a[j] + y_limit) * (fpr_limit - x0)
        return float(area / fpr_limit)

    def pro_curve(self, fpr_limit: float, weight_of_tag: np.ndarray):
        """The PRO curve's points from (0, 0) up to FPR = fpr_limit (cut there)."""
        fpr, fpr_prev, a, b = self._pro_walk(fpr_limit, weight_of_tag)
        # Within a group FPR and PRO rise together: segment (fpr_prev, a) -> (fpr, b).
        x = np.concatenate(([0.0], np.column_stack((fpr_prev, fpr)).reshape(-1)))
        y = np.concatenate(([0.0], np.column_stack((a, b)).reshape(-1)))
        inside = x <= fpr_limit
        j = int(np.count_nonzero(inside))
        x_out, y_out = x[inside], y[inside]
        if j < x.size and x[j] > x[j - 1]:
            y_limit = y[j - 1] + (y[j] - y[j - 1]) * (fpr_limit - x[j - 1]) / (x[j] - x[j - 1])
            x_out, y_out = np.append(x_out, fpr_limit), np.append(y_out, y_limit)
        return x_out, y_out


def _pixel_ranked(maps: ArrayLike, masks: ArrayLike,
                  with_regions: bool) -> tuple[_Ranked, np.ndarray | None]:
    m, g = _pixel_inputs(maps, masks)
    if not with_regions:
        return _Ranked(m.reshape(-1), g.reshape(-1).view(np.uint8), "masks (pixels)"), None
    regions, n_regions = ndimage.label(g, structure=_STRUCTURE_8)
    size = np.bincount(regions.reshape(-1), minlength=n_regions + 1)
    weight_of_tag = np.zeros(n_regions + 1)
    weight_of_tag[1:] = 1.0 / (n_regions * size[1:].astype(np.float64))
    ranked = _Ranked(m.reshape(-1), regions.reshape(-1).view(np.uint32), "masks (pixels)")
    return ranked, weight_of_tag


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, exact with tied scores (equals ``roc_auc_score``).

    Args:
        scores: (n,) or any shape: higher means more anomalous. Tensor, array or sequence.
        labels: same number of elements: 1 / True for anomalous, 0 / False for normal
            (values above 0.5 count as anomalous).

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: if every label is the same, sizes differ, or a score is NaN or infinite.
    """
    s, y = _image_inputs(scores, labels)
    return _Ranked(s, y.view(np.uint8), "labels").auroc()


def f1_max_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold that reaches it.

    Args:
        scores: (n,) or any shape: higher means more anomalous.
        labels: same number of elements, anomalous where above 0.5.

    Returns:
        ``(f1, threshold)``: the maximum F1 and the lowest score at which it is reached,
        predicting anomalous for ``score >= threshold``.

    Raises:
        ValueError: as :func:`auroc`.
    """
    s, y = _image_inputs(scores, labels)
    return _Ranked(s, y.view(np.uint8), "labels").f1_max()


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Best F1 over all thresholds ``score >= t``, exact with tied scores.

    Args:
        scores: (n,) or any shape: higher means more anomalous.
        labels: same number of elements, anomalous where above 0.5.

    Returns:
        The maximum F1 in (0, 1].

    Raises:
        ValueError: as :func:`auroc`.
    """
    return f1_max_threshold(scores, labels)[0]


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """AUROC over every pixel of every image.

    Args:
        maps: (B, H, W) or (B, 1, H, W) anomaly maps.
        masks: same shape, anomalous where above 0.5 (bool, {0, 1} or {0, 255}).

    Returns:
        Pixel AUROC in [0, 1].

    Raises:
        ValueError: if shapes differ, all pixels are of one class, or a map is not finite.
    """
    return _pixel_ranked(maps, masks, with_regions=False)[0].auroc()


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> float:
    """F1-max over every pixel of every image.

    Args:
        maps: (B, H, W) or (B, 1, H, W) anomaly maps.
        masks: same shape, anomalous where above 0.5.

    Returns:
        Pixel F1-max in (0, 1].

    Raises:
        ValueError: as :func:`pixel_auroc`.
    """
    return _pixel_ranked(maps, masks, with_regions=False)[0].f1_max()[0]


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Regions are the 8-connected components of each mask; see the module docstring.

    Args:
        maps: (B, H, W) or (B, 1, H, W) anomaly maps.
        masks: same shape, anomalous where above 0.5.
        fpr_limit: upper end of the FPR integration range, in (0, 1].

    Returns:
        AUPRO in [0, 1]: area up to ``fpr_limit`` divided by ``fpr_limit``.

    Raises:
        ValueError: if ``fpr_limit`` is outside (0, 1], shapes differ, no pixel (or every
            pixel) is anomalous, or a map is not finite.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    ranked, weight_of_tag = _pixel_ranked(maps, masks, with_regions=True)
    return ranked.aupro(fpr_limit, weight_of_tag)


def pro_curve(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3,
              points: int | None = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve behind :func:`aupro`: PRO against FPR up to the limit.

    Args:
        maps, masks: as :func:`aupro`.
        fpr_limit: where the curve is cut, in (0, 1].
        points: resample the curve at this many evenly spaced FPRs (for plotting; the exact
            curve can have a point per distinct normal score); None keeps every point.

    Returns:
        ``(fpr, pro)``, float64, from (0, 0) to FPR ``fpr_limit``; the trapezoid area of the
        exact curve divided by ``fpr_limit`` is :func:`aupro`.

    Raises:
        ValueError: as :func:`aupro`, or ``points`` below 2.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if points is not None and points < 2:
        raise ValueError(f"points must be at least 2 or None, got {points!r}")
    ranked, weight_of_tag = _pixel_ranked(maps, masks, with_regions=True)
    x, y = ranked.pro_curve(fpr_limit, weight_of_tag)
    if points is None:
        return x, y
    grid = np.linspace(0.0, float(x[-1]), points)
    # Vertical jumps (equal FPR) keep their top: np.interp takes the last of equal xs.
    return grid, np.interp(grid, x, y)


def evaluate(scores: ArrayLike, labels: ArrayLike, maps: ArrayLike | None = None,
             masks: ArrayLike | None = None, fpr_limit: float = 0.3) -> dict[str, float]:
    """The whole metric table for one set of predictions (e.g. one class's test set).

    The pixel metrics share one sort of the normal pixels.

    Args:
        scores: (B,) image anomaly scores.
        labels: (B,) image labels, 1 for anomalous.
        maps: (B, H, W) or (B, 1, H, W) anomaly maps, or None for image metrics only.
        masks: same shape as ``maps``, anomalous where above 0.5 (zeros for normal images).
        fpr_limit: AUPRO's integration limit.

    Returns:
        ``{"image_auroc", "image_f1_max"}`` and, with maps and masks,
        ``{"pixel_auroc", "pixel_f1_max", "aupro"}``, as Python floats (keys in ``METRICS``).

    Raises:
        ValueError: if only one of ``maps`` and ``masks`` is given, or as the metrics.
    """
    s, y = _image_inputs(scores, labels)
    image = _Ranked(s, y.view(np.uint8), "labels")
    result = {"image_auroc": image.auroc(), "image_f1_max": image.f1_max()[0]}
    if (maps is None) != (masks is None):
        raise ValueError("give both maps and masks, or neither")
    if maps is not None:
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        pixels, weight_of_tag = _pixel_ranked(maps, masks, with_regions=True)
        result["pixel_auroc"] = pixels.auroc()
        result["pixel_f1_max"] = pixels.f1_max()[0]
        result["aupro"] = pixels.aupro(fpr_limit, weight_of_tag)
    return result
