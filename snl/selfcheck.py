"""The self-check: a trained model scored on held-out normal images against cut-paste probes.

Now and then a training run learns, for some classes, to reproduce what it should flag (the
"identity mapping" of multi-class anomaly detection): its loss curve looks like any other
and nothing in the run shows it. Cut-paste probes see it: a patch of another class's
normal texture pasted into a normal image is scored no higher than the image itself. The
self-check needs no label and no test image: ``snl train`` holds out part of each class's
normal training images (:mod:`snl.data.holdout`; they are never trained on), builds
:data:`~snl.data.holdout.PROBES_PER_IMAGE` cut-paste probes from each, and after training
scores the held-out images (normal) against their probes (anomalous).

The figure, per class, is the image AUROC of those scores (the other metrics of
:func:`snl.metrics.evaluate` are recorded beside it). A class is *flagged* when its figure
is below :data:`FLAG_BELOW`. Scores and maps are compared rounded to :data:`SCORE_DECIMALS`
decimals: a student that reproduces the teacher exactly leaves only float32 rounding in its
maps (about 1e-7), which must not rank images; its every score rounds to 0, AUROC 0.5,
flagged.

Why 0.77: over 48 class-runs of ``snl compare`` on the embedded default set (12 runs x 4
classes, SNL and RD, two settings), the image AUROC of the cut-paste probe built from
``test/good`` images was at most 0.756 on the five broken class-runs (more than 10 points
of real-defect image AUROC under their class's median) and at least 0.781 on the 43 good
ones; 0.77 is the middle of that gap, fixed before the held-out probes existed. It is a
constant, not a setting, so that a flag means the same thing in every run.

Where a framework hands over batches of images rather than files (the anomalib adapter's
validation), :func:`cutpaste_batch` makes the probes from the batch itself and
:func:`probe_auroc` scores them the same way.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from . import html_report, metrics, report
from .data.holdout import (
    HOLDOUT_FRACTION,
    PROBES_PER_IMAGE,
    Holdout,
    make_holdout_probes,
    to_model_input,
)
from .data.probes import _PATCH
from .data.textures import read_manifest

#: A class whose self-check figure (probe image AUROC) is below this is flagged.
FLAG_BELOW = 0.77
#: A class-run is broken when its real image AUROC is more than this under the median of its
#: group (the same class and structure over seeds): the studies' definition (docs/cli.md).
BROKEN_BELOW_MEDIAN = 0.10


def broken(aurocs: Sequence[float], groups: Sequence) -> np.ndarray:
    """Which class-runs are broken: image AUROC more than ``BROKEN_BELOW_MEDIAN`` under the
    median of the runs of the same group (``groups[i]``: any hashable key of run i)."""
    values = np.asarray(aurocs, dtype=float)
    keys = list(groups)
    median = {key: np.median([v for v, k in zip(values, keys, strict=True) if k == key])
              for key in set(keys)}
    return np.array([v < median[k] - BROKEN_BELOW_MEDIAN
                     for v, k in zip(values, keys, strict=True)], dtype=bool)


#: Scores and maps are rounded to this many decimals before they are ranked: differences
#: below it are float32 rounding of a cosine distance (about 1e-7), not evidence.
SCORE_DECIMALS = 5
#: The key of the figure among each class's metrics.
FIGURE = "image_auroc"
#: The file the self-check is written to, in a run folder.
FILE = "self_check.json"

_WHAT = ("image AUROC of the held-out normal training images against their cut-paste "
         "probes")


@torch.no_grad()
def _predict(model, images: np.ndarray, device: torch.device, batch_size: int):
    norm = model.normalization
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size], norm.mean, norm.std)
        s, m = model.predict(x.to(device))
        scores.append(s.float().cpu())
        maps.append(m[:, 0].float().cpu())
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def run(model, holdout: Holdout, size: int, device: torch.device | str | None = None,
        root: str | os.PathLike | None = None, batch_size: int = 16) -> dict:
    """Score the held-out images against their probes; the self-check of every class.

    Args:
        model: a trained :class:`snl.SNL` (put in eval mode here).
        holdout: the held-out images (:func:`snl.data.split_holdout`).
        size: the model's image side, in pixels.
        device: where the model runs (default: where its parameters are).
        root: the data set folder; files are recorded relative to it when given.
        batch_size: images per forward pass.

    Returns:
        A JSON-able dict: ``classes`` (per class ``held_out``, ``train_images``, ``probes``,
        the metrics of :func:`snl.metrics.evaluate` on held-out vs probes, ``paired``: the
        fraction of probes scored above the held-out image they were made from, ties
        counting half, and ``flagged``),
        ``flagged`` (the flagged classes, in order), ``flag_below``, ``figure``,
        ``shared_pixels`` (:func:`shared_pixels`; None without ``root``), and the held-out
        files (``held_out``) and each probe's sources (``probe_sources``).
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.eval()
    sets = make_holdout_probes(holdout, size, root=root)
    classes, sources = {}, {}
    for name, probe_set in sets.items():
        images = np.concatenate([probe_set.normals, probe_set.probes])
        scores, maps = _predict(model, images, device, batch_size)
        n, m = len(probe_set.normals), len(probe_set.probes)
        labels = np.r_[np.zeros(n, dtype=np.int64), np.ones(m, dtype=np.int64)]
        masks = np.concatenate([np.zeros((n, *probe_set.masks.shape[1:]), dtype=bool),
                                probe_set.masks])
        row = metrics.evaluate(np.round(scores.astype(np.float64), SCORE_DECIMALS), labels,
                               np.round(maps.astype(np.float64), SCORE_DECIMALS), masks)
        rounded = np.round(scores.astype(np.float64), SCORE_DECIMALS)
        base = rounded[np.arange(m) % n]  # probe i was made from held-out image i % n
        paired = float(np.mean((rounded[n:] > base) + 0.5 * (rounded[n:] == base)))
        classes[name] = {"held_out": n, "train_images": holdout.counts[name], "probes": m,
                         **row, "paired": paired, "flagged": bool(row[FIGURE] < FLAG_BELOW)}
        sources[name] = probe_set.sources

    def rel(path: Path) -> str:
        return str(path.relative_to(root)) if root is not None else str(path)

    return {"figure": FIGURE, "what": _WHAT, "flag_below": FLAG_BELOW,
            "holdout_fraction": HOLDOUT_FRACTION, "probes_per_image": PROBES_PER_IMAGE,
            "held_out_trained_on": False,
            "shared_pixels": shared_pixels(holdout, root) if root is not None else None,
            "classes": classes,
            "flagged": [name for name, row in classes.items() if row["flagged"]],
            "held_out": {name: [rel(p) for p in paths] for name, paths in holdout.held.items()},
            "probe_sources": sources}


def _intersect(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two ``[y, x, h, w]`` boxes share a pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def shared_pixels(holdout: Holdout, root: str | os.PathLike) -> dict[str, int] | None:
    """Per class, how many held-out images share pixels with an image trained on.

    Known only for the embedded default set, whose ``dataset.json`` records the box each
    image was cut from its photograph (None for any other data: separate photographs share
    none). There every training crop comes from one band of a photograph, so most held-out
    crops overlap trained ones; the self-check's figure follows such familiar images poorly
    (``docs/cli.md``).
    """
    root = Path(root)
    manifest = read_manifest(root / "dataset.json", "snl.data.textures")
    if manifest is None:
        return None
    counts = {}
    for name, paths in holdout.held.items():
        boxes = manifest.get("boxes", {}).get(name, {})
        if not all(p.is_relative_to(root / name) for p in paths):
            return None  # not this set's files
        held = {p.relative_to(root / name).as_posix() for p in paths}
        trained = [box for key, box in boxes.items()
                   if key.startswith("train/") and key not in held]
        counts[name] = sum(any(_intersect(boxes[key], box) for box in trained)
                           for key in sorted(held) if key in boxes)
    return counts


def _shared_note(check: Mapping) -> str:
    shared = check.get("shared_pixels") or {}
    if not any(shared.values()):
        return ""
    held = sum(row["held_out"] for row in check["classes"].values())
    return (f"{sum(shared.values())} of the {held} held-out images share pixels with "
            "trained ones (the embedded set's crops overlap); the figure follows such "
            "images poorly")


def cutpaste_batch(images: torch.Tensor, seed: int = 0,
                   offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut-paste probes of a batch of normal images of one class, one per image.

    Probe ``i`` takes a rectangle (each side 15% to 35% of the image's) from another image of
    the batch (the image itself when the batch has one) and pastes it at a random place of
    image ``i``, another place than it was cut from; everything is drawn from
    ``default_rng([seed, offset + i])``.

    Args:
        images: (B, C, H, W), any normalisation (pixels are copied, not changed).
        seed: seed of the draws.
        offset: added to the image index in the seed (e.g. the batch's first image's index in
            the epoch), so that every probe of an epoch has its own stream.

    Returns:
        ``(probes, masks)``: (B, C, H, W) like ``images`` and (B, H, W) bool.
    """
    b, _, height, width = images.shape
    probes, masks = images.clone(), torch.zeros(b, height, width, dtype=torch.bool)
    for i in range(b):
        rng = np.random.default_rng([seed, offset + i])
        j = (i + 1 + int(rng.integers(b - 1))) % b if b > 1 else i
        h, w = (max(2, round(float(rng.uniform(*_PATCH)) * side)) for side in (height, width))
        while True:
            sy, sx = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            ty, tx = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            if j != i or (sy, sx) != (ty, tx) or (h, w) == (height, width):
                break
        probes[i, :, ty:ty + h, tx:tx + w] = images[j, :, sy:sy + h, sx:sx + w]
        masks[i, ty:ty + h, tx:tx + w] = True
    return probes, masks


def probe_auroc(normal_scores: np.ndarray, probe_scores: np.ndarray) -> float:
    """Image AUROC of normal images (0) against probes (1), scores rounded to
    :data:`SCORE_DECIMALS` decimals as :func:`run` rounds them."""
    scores = np.round(np.r_[normal_scores, probe_scores].astype(np.float64), SCORE_DECIMALS)
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(probe_scores))]
    return metrics.auroc(scores, labels)


def figures(check: Mapping | None) -> dict[str, float]:
    """``{class: figure}`` of a self-check (empty for None)."""
    if not check:
        return {}
    return {name: float(row[check.get("figure", FIGURE)])
            for name, row in check["classes"].items()}


def warning_lines(check: Mapping | None) -> list[str]:
    """One console line per flagged class, naming it and its figure."""
    if not check:
        return []
    return [f"self-check: WARNING: class {name} flagged: probe image AUROC "
            f"{100 * check['classes'][name][FIGURE]:.1f} < {100 * check['flag_below']:.1f} "
            "(the student may reproduce anomalies instead of flagging them); retrain with "
            "another --seed, or with --restarts N"
            for name in check["flagged"]]


def summary_line(check: Mapping) -> str:
    """One line: every class's figure and how many are flagged."""
    values = ", ".join(f"{name} {100 * v:.1f}" for name, v in figures(check).items())
    flagged = check["flagged"]
    verdict = (f"{len(flagged)} flagged ({', '.join(flagged)})" if flagged
               else "no class flagged")
    note = _shared_note(check)
    return (f"self-check (probe image AUROC, flagged below {100 * check['flag_below']:.1f}): "
            f"{values}; {verdict}" + (f". Note: {note}" if note else ""))


def preference(check: Mapping) -> tuple[float, float, float]:
    """Sort key of a run's self-check, higher is preferred: fewer flagged classes, then the
    higher lowest figure, then the higher mean figure."""
    values = list(figures(check).values())
    if not values:
        return (0.0, -math.inf, -math.inf)
    return (-float(len(check["flagged"])), min(values), float(np.mean(values)))


def write(out_dir: str | os.PathLike, check: Mapping) -> Path:
    """``out_dir/self_check.json``."""
    path = Path(out_dir) / FILE
    report.write_json(path, dict(check))
    return path


def read(run_dir: str | os.PathLike) -> dict | None:
    """The self-check a run folder holds, or None."""
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _explanation(check: Mapping) -> str:
    counts = ", ".join(f"{name} {row['held_out']} of {row['train_images']}"
                       for name, row in check["classes"].items())
    lender = ("another class's held-out image, pasted in" if len(check["classes"]) > 1
              else "another held-out image of the class, pasted at another place")
    return (f"Held-out normal training images (never trained on; per class: {counts}) "
            f"against {check['probes_per_image']} cut-paste probes each (a rectangle of "
            f"{lender}): the image AUROC per class, no label used. A class below "
            f"{100 * check['flag_below']:.1f} is flagged: the student may reproduce anomalies "
            "instead of flagging them." + (f" Note: {note}." if (note := _shared_note(check))
                                           else ""))


def _rows(check: Mapping) -> list[list[str]]:
    return [[name, str(row["held_out"]), str(row["probes"]), f"{100 * row[FIGURE]:.1f}",
             f"{100 * row['pixel_auroc']:.1f}", "FLAGGED" if row["flagged"] else "ok"]
            for name, row in check["classes"].items()]


_HEADERS = ["class", "held out", "probes", "probe image AUROC", "probe pixel AUROC", "verdict"]


def markdown_section(check: Mapping) -> list[str]:
    """The self-check's section of ``report.md``, as lines."""
    lines = ["## Self-check", "", _explanation(check), "",
             "| " + " | ".join(_HEADERS) + " |", "|---|" + "---|" * (len(_HEADERS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(check)]
    lines += ["", *(f"**{line}**" for line in warning_lines(check))]
    return lines


def html_section(check: Mapping) -> str:
    """The self-check's section of ``report.html``."""
    h = html_report
    parts = [h.paragraph(_explanation(check)), h.table(_HEADERS, _rows(check))]
    parts += [f'<p class="wrong">{html.escape(line)}</p>' for line in warning_lines(check)]
    return h.section("Self-check", *parts)
