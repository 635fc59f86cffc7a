"""A decision threshold and a normalised score, learned from an evaluated test set.

Raw anomaly scores (the maximum of a blurred map) have no unit: 2.5 means nothing without
the run's distribution. Evaluation therefore stores, with the checkpoint, a threshold and
the range of the scores it saw; prediction then reports per image the raw score, a
normalised score and a label::

    normalised = clip((score - threshold) / (max - min) + 0.5, 0, 1)
    label      = "anomalous" if score >= threshold else "normal"

so 0.5 is the threshold, and the normalisation is monotone (AUROC unchanged). The
threshold is either the one that maximises the image F1 on the evaluated set (``"f1"``,
predicting anomalous for ``score >= threshold``) or the one that lets at most a fraction
``fpr`` of its good images through as anomalous (``"fpr=0.05"``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import metrics

LABELS = ("normal", "anomalous")


@dataclass(frozen=True)
class Calibration:
    """What prediction needs to turn raw scores into normalised scores and labels."""

    threshold: float  #: raw score at and above which an image is anomalous
    low: float  #: the lowest raw score of the evaluated set
    high: float  #: the highest raw score of the evaluated set
    method: str  #: "f1" or "fpr=<fraction>"

    def normalise(self, scores):
        """Normalised scores (0.5 at the threshold, within [0, 1]): NumPy or torch in, same out."""
        span = max(self.high - self.low, 1e-12)
        if isinstance(scores, torch.Tensor):
            return ((scores - self.threshold) / span + 0.5).clamp(0.0, 1.0)
        return np.clip((np.asarray(scores, dtype=np.float64) - self.threshold) / span + 0.5,
                       0.0, 1.0)

    def label(self, score: float) -> str:
        return LABELS[int(score >= self.threshold)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> Calibration | None:
        return None if not values else cls(**values)


def parse_method(text: str) -> str:
    """``"f1"`` or ``"fpr=F"`` with 0 <= F < 1, checked; returns it normalised."""
    if text == "f1":
        return text
    if text.startswith("fpr="):
        try:
            value = float(text[4:])
        except ValueError:
            value = math.nan
        if 0.0 <= value < 1.0:
            return f"fpr={value:g}"
    raise ValueError(f"threshold must be 'f1' or 'fpr=F' with 0 <= F < 1, got {text!r}")


def calibrate(scores, labels, method: str = "f1") -> Calibration:
    """The threshold of ``method`` on image scores and labels (1 = defect), and their range.

    Raises:
        ValueError: a bad method, or a set without good images (or, for "f1", without
            defect images).
    """
    method = parse_method(method)
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    if s.size == 0 or y.all():
        raise ValueError("calibration needs good images among the evaluated ones")
    if method == "f1":
        _, threshold = metrics.f1_max_threshold(s, y)
    else:
        fpr = float(method[4:])
        good = np.sort(s[~y])[::-1]  # descending
        allowed = math.floor(fpr * good.size)  # good images allowed at or above it
        # the lowest threshold passing at most `allowed` good images: just above the
        # (allowed + 1)-th highest good score
        threshold = float(np.nextafter(good[allowed], np.inf))
    return Calibration(float(threshold), float(s.min()), float(s.max()), method)
