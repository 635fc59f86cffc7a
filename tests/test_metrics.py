"""snl.metrics against scikit-learn (AUROC) and brute-force loops over thresholds (F1, AUPRO).

The brute-force AUPRO follows MVTec AD's evaluation code step by step: 8-connected regions
(found here by an explicit flood fill), one curve point per distinct threshold, (0, 0) and
(1, 1) appended, trapezoids up to the limit with the crossing segment interpolated.
"""

from __future__ import annotations

import bisect
import os
import time

import numpy as np
import pytest
import torch

from snl import metrics

roc_auc_score = pytest.importorskip(
    "sklearn.metrics", reason="scikit-learn is the AUROC oracle; pip install scikit-learn"
).roc_auc_score

SLOW = os.environ.get("SNL_SLOW_TESTS") == "1"


def regions_8(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a 2-D bool mask, by flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        region = np.zeros_like(mask, dtype=bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if (0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u]
                            and not seen[v, u]):
                        seen[v, u] = True
                        stack.append((v, u))
        out.append(region)
    return out


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks, dtype=bool)
    regions = [(i, r) for i in range(len(masks)) for r in regions_8(masks[i])]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        hit = maps >= t
        xs.append(hit[normal].mean())
        ys.append(np.mean([hit[i][r].mean() for i, r in regions]))
    xs.append(1.0)
    ys.append(1.0)
    x, y = np.array(xs), np.array(ys)
    correction = 0.0
    if limit not in x:
        ins = bisect.bisect(x, limit)
        y_limit = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_limit + y[ins - 1]) * (limit - x[ins - 1])
    keep = x <= limit
    x, y = x[keep], y[keep]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / limit


def brute_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def random_masks(rng: np.random.Generator, b: int, h: int, w: int, p: float) -> np.ndarray:
    """Sparse random pixels grown a little: blobs, single pixels, diagonal touches."""
    masks = rng.random((b, h, w)) < p
    grow = rng.random((b, h, w)) < 0.5
    masks[:, 1:] |= masks[:, :-1] & grow[:, 1:]
    masks[0] = False  # an image with no defect at all
    return masks


def scores_for(rng: np.random.Generator, masks: np.ndarray, levels: int | None) -> np.ndarray:
    maps = rng.random(masks.shape) + 0.7 * masks
    if levels is not None:  # few distinct values: ties everywhere, across classes too
        maps = np.round(maps * levels) / levels
    return maps


@pytest.mark.parametrize("levels", [None, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = scores_for(rng, labels, levels)
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores),
                                                          abs=1e-12)


def test_auroc_extremes_and_inputs() -> None:
    labels = np.array([0, 0, 1, 1])
    assert metrics.auroc([0.1, 0.2, 0.3, 0.4], labels) == 1.0
    assert metrics.auroc([0.4, 0.3, 0.2, 0.1], labels) == 0.0
    assert metrics.auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    scores = torch.tensor([0.1, 0.7, 0.3, 0.4], dtype=torch.bfloat16)
    expected = roc_auc_score(labels, scores.float().numpy())
    assert metrics.auroc(scores, torch.tensor([False, False, True, True])) == expected


def test_float32_sort_keys_order_negatives_and_signed_zeros() -> None:
    # float32 scores are sorted as packed integer keys: negative values, -0.0 == +0.0 ties,
    # huge and tiny magnitudes must order exactly as the floats do.
    rng = np.random.default_rng(11)
    values = np.array([-np.inf, -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-40, 2.5, 3e38, np.inf])
    scores = rng.choice(values[1:-1], 400).astype(np.float32)
    labels = rng.random(400) < 0.4
    expected = roc_auc_score(labels, scores.astype(np.float64))
    assert metrics.auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.auroc(scores.astype(np.float64), labels) == pytest.approx(expected, abs=1e-12)
    f1, threshold = metrics.f1_max_threshold(scores, labels)
    assert f1 == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)
    assert threshold in scores


def test_float32_and_float64_pixel_paths_agree() -> None:
    rng = np.random.default_rng(12)
    masks = random_masks(rng, 3, 16, 16, 0.05)
    maps = scores_for(rng, masks, 7).astype(np.float32) - 0.5
    table32 = metrics.evaluate(maps.max((1, 2)), masks.any((1, 2)), maps, masks)
    maps64 = maps.astype(np.float64)
    table64 = metrics.evaluate(maps64.max((1, 2)), masks.any((1, 2)), maps64, masks)
    for key in metrics.METRICS:
        assert table32[key] == pytest.approx(table64[key], abs=1e-12), key
    half = torch.from_numpy(maps).half()  # float16 maps: heavy ties, exact in float32
    assert metrics.aupro(half, masks) == pytest.approx(
        brute_aupro(half.double().numpy(), masks, 0.3), abs=1e-12)


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_matches_brute_force(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.2
    scores = scores_for(rng, labels, levels)
    f1, threshold = metrics.f1_max_threshold(scores, labels)
    assert f1 == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)
    pred = scores >= threshold
    assert f1 == pytest.approx(2 * np.sum(pred & labels) / (np.sum(pred) + np.sum(labels)))
    assert metrics.f1_max(scores, labels) == f1


def test_pixel_metrics_are_flattened_image_metrics() -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 4, 16, 16, 0.05)
    maps = scores_for(rng, masks, 10)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics.pixel_f1_max(maps[:, None], masks[:, None]) == pytest.approx(
        brute_f1_max(maps.ravel(), masks.ravel()), abs=1e-12)


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, None), (2, 3), (3, 6), (4, 20)])
def test_aupro_matches_brute_force(seed: int, levels: int | None, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 4, 10, 12, 0.06)
    maps = scores_for(rng, masks, levels).astype(np.float32)
    expected = brute_aupro(maps, masks, limit)
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    assert metrics.aupro(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.uint8) * 255),
                         fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_limit_hit_exactly() -> None:
    # 10 normal pixels with distinct scores: FPR steps by 0.1 and lands on 0.3... or near it
    # in floating point; both rules (exact hit, interpolation) must agree with MVTec's.
    maps = np.array([[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.75, 0.35]]])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, 10:] = True  # two pixels, one region
    for limit in (0.3, 0.2, 0.25):
        assert metrics.aupro(maps, masks, limit) == pytest.approx(
            brute_aupro(maps, masks, limit), abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    maps = np.zeros((1, 4, 4))
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal: one 8-region of 3 px
    masks[0, 0, 3] = True  # a separate region of 1 px
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # 2 of the 3 diagonal pixels found at FPR 0
    # PRO at FPR 0: 8-connected (2/3 + 0) / 2 = 1/3 (4-connected: (1 + 1 + 0 + 0) / 4).
    # Every other pixel ties at 0, so the curve then goes straight to (1, 1).
    pro_0 = 1 / 3
    pro_limit = pro_0 + (1 - pro_0) * 0.3
    assert metrics.aupro(maps, masks) == pytest.approx((pro_0 + pro_limit) / 2, abs=1e-12)
    assert metrics.aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks, 0.3), abs=1e-12)


def test_aupro_full_range_is_region_weighted_auroc() -> None:
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 3, 20, 20, 0.04)
    maps = scores_for(rng, masks, 5)
    weights = np.ones(masks.shape)
    for i in range(len(masks)):
        for r in regions_8(masks[i]):
            weights[i][r] = 1.0 / r.sum()
    expected = roc_auc_score(masks.ravel(), maps.ravel(), sample_weight=weights.ravel())
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(expected, abs=1e-12)


def test_single_pixel_regions_and_perfect_maps() -> None:
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[1, 0, 0] = masks[1, 4, 4] = masks[1, 2, 0] = True
    maps = masks.astype(np.float32)
    assert metrics.aupro(maps, masks) == 1.0
    assert metrics.pixel_auroc(maps, masks) == 1.0
    assert metrics.pixel_f1_max(maps, masks) == 1.0
    assert metrics.aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks, 0.3), abs=1e-12)


def test_evaluate_table() -> None:
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 6, 12, 12, 0.05)
    maps = scores_for(rng, masks, None)
    labels = masks.reshape(6, -1).any(1)
    scores = maps.reshape(6, -1).max(1)
    table = metrics.evaluate(scores, labels, torch.from_numpy(maps)[:, None], masks[:, None])
    assert tuple(table) == metrics.METRICS
    assert table["image_auroc"] == metrics.auroc(scores, labels)
    assert table["image_f1_max"] == metrics.f1_max(scores, labels)
    assert table["pixel_auroc"] == metrics.pixel_auroc(maps, masks)
    assert table["pixel_f1_max"] == metrics.pixel_f1_max(maps, masks)
    assert table["aupro"] == metrics.aupro(maps, masks)
    assert all(isinstance(v, float) for v in table.values())
    assert tuple(metrics.evaluate(scores, labels)) == metrics.METRICS[:2]


def test_per_type_metrics_score_each_type_against_the_good_images() -> None:
    from snl.cli.evaluation import per_type_metrics

    rng = np.random.default_rng(7)
    defects = ["good", "scratch", "good", "mixup", "scratch", "good", "mixup", "mixup"]
    n = len(defects)
    masks = np.zeros((n, 8, 8), dtype=np.uint8)
    for i, d in enumerate(defects):
        if d == "scratch":
            masks[i, 2:4, 1:6] = 1
        elif d == "mixup":
            masks[i] = 1
    maps = rng.random((n, 8, 8)).astype(np.float32) + masks * rng.random((n, 1, 1))
    scores = maps.reshape(n, -1).max(1)
    labels = np.array([d != "good" for d in defects], dtype=np.int64)
    table = per_type_metrics(scores, labels, maps, masks, defects)
    assert list(table) == ["scratch", "mixup"]
    for kind in table:
        pick = [i for i, d in enumerate(defects) if d in ("good", kind)]
        assert table[kind] == metrics.evaluate(scores[pick], labels[pick], maps[pick],
                                               masks[pick])
    assert table["scratch"] != table["mixup"]
    no_good = per_type_metrics(scores[[1, 4]], labels[[1, 4]], maps[[1, 4]], masks[[1, 4]],
                               ["scratch", "scratch"])
    assert all(np.isnan(v) for v in no_good["scratch"].values())


def test_degenerate_and_bad_inputs_raise() -> None:
    maps = np.linspace(0, 1, 18).reshape(2, 3, 3)
    with pytest.raises(ValueError, match="all 3 are normal"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="all 2 are anomalous"):
        metrics.f1_max([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="all 18 are normal"):
        metrics.aupro(maps, np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="all 9 are anomalous"):
        metrics.pixel_auroc(maps[:1], np.ones((1, 3, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="differ in size"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"same shape, got maps \(2, 3, 3\) and masks \(2, 3, 4\)"):
        metrics.aupro(maps, np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\], got 0"):
        metrics.aupro(maps[:1], np.eye(3)[None], fpr_limit=0)
    with pytest.raises(ValueError, match="both maps and masks"):
        metrics.evaluate([0.1, 0.2], [0, 1], maps=np.zeros((2, 3, 3)))


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="speed test: set SNL_SLOW_TESTS=1 to run it")
def test_pixel_metrics_speed_2000_masks_256() -> None:
    rng = np.random.default_rng(0)
    b, h, w = 2000, 256, 256
    masks = np.zeros((b, h, w), dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    for i in range(b // 2, b):  # half the images defective: a few discs each (~3% of pixels)
        for _ in range(int(rng.integers(1, 5))):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 40)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    maps = rng.random((b, h, w), dtype=np.float32)
    maps += 0.5 * masks
    scores = maps.reshape(b, -1).max(1)
    labels = masks.reshape(b, -1).any(1)
    start = time.perf_counter()
    table = metrics.evaluate(scores, labels, torch.from_numpy(maps), torch.from_numpy(masks))
    elapsed = time.perf_counter() - start
    print(f"\nevaluate on {b} x {h}x{w} ({masks.mean():.1%} defect pixels): {elapsed:.1f} s, "
          f"{table}")
    assert elapsed < 30.0
