"""Run reports: metrics JSON, a markdown table per class, a ROC plot and map overlays."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRIC_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO@0.3"),
    ("image_f1_max", "image F1-max"),
    ("pixel_f1_max", "pixel F1-max"),
    # The self-check (snl.selfcheck): held-out normal training images against their
    # cut-paste probes, no test image involved; present in runs that held images out.
    ("self_check", "self-check"),
)


def with_mean(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-class metrics plus a "mean" row (mean over classes of each metric)."""
    table = {name: dict(row) for name, row in per_class.items()}
    keys = [k for k, _ in METRIC_COLUMNS if all(k in row for row in per_class.values())]
    if per_class:
        table["mean"] = {k: float(np.mean([row[k] for row in per_class.values()])) for k in keys}
    return table


def markdown_table(table: Mapping[str, Mapping[str, float]]) -> str:
    keys = [(k, label) for k, label in METRIC_COLUMNS if any(k in row for row in table.values())]
    lines = ["| class | " + " | ".join(label for _, label in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, row in table.items():
        cells = []
        for k, _ in keys:
            v = row.get(k)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v))
                         else f"{100 * v:.1f}")
        label = f"**{name}**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (descending)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(~y)[distinct]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr


def plot_roc(path: str | Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """One image-level ROC curve per class: ``curves[name] = (scores, labels)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (scores, labels) in curves.items():
        if labels.min() == labels.max():
            continue
        fpr, tpr = roc_curve(np.asarray(scores), np.asarray(labels))
        ax.plot(fpr, tpr, label=name, linewidth=1.2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("image-level ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overlay(image: np.ndarray, amap: np.ndarray, vmax: float, mask: np.ndarray | None = None,
            alpha: float = 0.5) -> np.ndarray:
    """Blend an anomaly map (jet colours, 0..vmax) over an RGB uint8 image; outline the mask."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(amap / max(vmax, 1e-12), 0.0, 1.0))[..., :3]
    out = (1 - alpha) * image.astype(np.float64) / 255.0 + alpha * heat
    if mask is not None and mask.any():
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = (1.0, 1.0, 1.0)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def write_report(path: str | Path, title: str, table: Mapping[str, Mapping[str, float]],
                 config: Mapping[str, Any], extra: Sequence[str] = ()) -> None:
    """The run's markdown report: the per-class table, the config, links to figures."""
    lines = [f"# {title}", "", "Metrics in percent.", "", markdown_table(table), ""]
    lines += list(extra)
    lines += ["", "## Configuration", "", "```json", json.dumps(dict(config), indent=2,
                                                              sort_keys=True, default=str),
              "```", ""]
    Path(path).write_text("\n".join(lines))
