"""snl.calibration: the stored decision threshold and the normalised score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snl import metrics
from snl.calibration import Calibration, calibrate, parse_method


def _set(seed=0, n_good=40, n_bad=25):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(1.0, 0.3, n_good), rng.normal(1.8, 0.4, n_bad)]
    labels = np.r_[np.zeros(n_good), np.ones(n_bad)]
    return scores, labels


def test_f1_threshold_is_the_f1_optimal_one():
    scores, labels = _set()
    c = calibrate(scores, labels, "f1")
    assert c.threshold == metrics.f1_max_threshold(scores, labels)[1]
    assert (c.low, c.high, c.method) == (scores.min(), scores.max(), "f1")
    predicted = scores >= c.threshold
    tp = (predicted & (labels > 0)).sum()
    f1 = 2 * tp / (predicted.sum() + (labels > 0).sum())
    assert f1 == pytest.approx(metrics.f1_max(scores, labels))


@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.1, 0.5])
def test_fpr_threshold_is_the_lowest_that_keeps_the_rate(fpr):
    scores, labels = _set(1)
    good = scores[labels == 0]
    c = calibrate(scores, labels, f"fpr={fpr}")
    assert np.mean(good >= c.threshold) <= fpr
    # any lower threshold down to the next good score lets one more good image through
    below = good[good < c.threshold].max()
    assert np.mean(good >= below) > fpr


def test_normalise_is_half_at_the_threshold_monotone_and_clipped():
    c = Calibration(threshold=2.0, low=1.0, high=5.0, method="f1")
    x = np.array([-10.0, 1.0, 2.0, 3.0, 100.0])
    got = c.normalise(x)
    assert got.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(c.normalise(torch.tensor(x, dtype=torch.float32)),
                               torch.tensor(got, dtype=torch.float32))
    assert [c.label(v) for v in (1.99, 2.0)] == ["normal", "anomalous"]
    assert Calibration.from_dict(c.to_dict()) == c
    assert Calibration.from_dict(None) is None


@pytest.mark.parametrize("bad", ["", "F1", "fpr=", "fpr=1", "fpr=-0.1", "fpr=x", "max"])
def test_bad_methods_are_named(bad):
    with pytest.raises(ValueError, match=f"threshold must be 'f1' or 'fpr=F' .* got {bad!r}"):
        parse_method(bad)
    assert parse_method("fpr=0.050") == "fpr=0.05"


def test_a_set_without_good_images_cannot_be_calibrated():
    with pytest.raises(ValueError, match="needs good images"):
        calibrate([1.0, 2.0], [1, 1])
