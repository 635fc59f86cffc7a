"""``snl eval`` and the evaluation after training: per-class metrics, report, ROC, overlays.

Evaluation writes ``metrics.json`` (per class: good against all defect images),
``metrics_by_type.json`` (per class and defect type, cross-class probes included when asked
for), ``calibration.json`` (the decision threshold and score range, :mod:`snl.calibration`),
``report.md``, ``report.html`` (self-contained: tables, ROC and PRO curves, image grids with
the misses, :mod:`snl.html_report`), ``curves.json`` (the curves' points), ``roc.png`` and
``overlays/*.png`` to its folder; given a self-check (:mod:`snl.selfcheck`), its figure is a
column of the per-class table and ``self_check.json`` is written too. Under ``torchrun``
every process predicts its shard of each class's test set; the shards are gathered and
rank 0 scores and writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import calibration, distributed, html_report, metrics, report, selfcheck
from ..data import GOOD, TestDataset, make_probes, parse_kinds
from .console import progress

OVERLAYS_PER_CLASS = 4


@torch.no_grad()
def _predict_set(model, dataset: TestDataset, indices: Sequence[int], batch_size: int,
                 world: distributed.World, desc: str):
    scores, maps, masks, labels = [], [], [], []
    subset = torch.utils.data.Subset(dataset, list(indices))
    cuda = world.device.type == "cuda"
    loader = DataLoader(subset, batch_size=batch_size, pin_memory=cuda)
    for batch in progress(loader, world, desc=desc):
        s, m = model.predict(batch["image"].to(world.device, non_blocking=cuda))
        scores.append(s.float().cpu())
        maps.append(m[:, 0].float().cpu())
        masks.append(batch["mask"][:, 0].to(torch.uint8))
        labels.append(torch.as_tensor(batch["label"]))
    if not scores:
        size = dataset.size
        return (torch.zeros(0), torch.zeros(0, *size), torch.zeros(0, *size, dtype=torch.uint8),
                torch.zeros(0, dtype=torch.long))
    return torch.cat(scores), torch.cat(maps), torch.cat(masks), torch.cat(labels)


def _predict_gathered(model, dataset: TestDataset, batch_size: int, world: distributed.World,
                      desc: str):
    """(scores, maps, masks, labels) of the whole data set on rank 0 (None elsewhere)."""
    mine = range(world.rank, len(dataset), world.size)
    local = _predict_set(model, dataset, mine, batch_size, world, desc)
    order = torch.tensor(list(mine), dtype=torch.long)
    gathered = [distributed.gather_cat(world, t) for t in (*local, order)]
    if not world.is_main:
        return None
    scores, maps, masks, labels, index = gathered
    rank_order = torch.argsort(index)
    return tuple(t[rank_order] for t in (scores, maps, masks, labels))


def per_type_metrics(scores, labels, maps, masks, defects: Sequence[str]) -> dict:
    """Metrics of each defect type: its images against the good ones (image and pixel).

    Args:
        scores, labels, maps, masks: one class's predictions (NumPy arrays, as
            :func:`snl.metrics.evaluate` takes them).
        defects: each image's defect type, ``"good"`` for normal images.

    Returns:
        ``{type: {metric: value}}`` in order of first appearance; NaN metrics when the class
        has no good image to compare with.
    """
    defects = np.asarray(defects)
    good = defects == GOOD
    result = {}
    for kind in dict.fromkeys(d for d in defects.tolist() if d != GOOD):
        pick = good | (defects == kind)
        if not good.any():
            result[kind] = {k: math.nan for k in metrics.METRICS}
            continue
        result[kind] = metrics.evaluate(scores[pick], labels[pick], maps[pick], masks[pick])
    return result


def _mean_by_type(by_type: dict[str, dict[str, dict[str, float]]]) -> dict:
    """Mean over the classes that have each type, of each metric."""
    rows: dict[str, list[dict[str, float]]] = {}
    for types in by_type.values():
        for kind, row in types.items():
            rows.setdefault(kind, []).append(row)
    return {kind: {k: float(np.mean([r[k] for r in group])) for k in group[0]}
            for kind, group in rows.items()}


@dataclass
class Evaluation:
    """The result of :func:`evaluate_all` (on every rank; empty dicts off rank 0)."""

    table: dict  #: ``{class: {metric: value}, ..., "mean": {...}}``: good vs all real defects
    by_type: dict  #: ``{class: {type: {metric: value}}, ..., "mean": {type: {...}}}``
    #: the decision threshold and score range over every class's test images (probes not
    #: included), :class:`snl.calibration.Calibration` as a dict; None off rank 0
    calibration: dict | None = None


def evaluate_all(model, data_root: str | os.PathLike, classes: str | list[str],
                 image_size: int, out_dir: str | os.PathLike,
                 world: distributed.World | None = None, config: dict[str, Any] | None = None,
                 batch_size: int = 16, probes: Sequence[str] = (), probe_seed: int = 0,
                 probe_root: str | os.PathLike | None = None, probe_count: int = 8,
                 quiet: bool = False, threshold: str = "f1",
                 self_check: dict | None = None) -> Evaluation:
    """Per-class and per-defect-type metrics of ``model``; writes the report on rank 0.

    Each process predicts its shard of every class (images i with i % world == rank); the
    shards are gathered, so rank 0 scores the whole test set. The per-class table (and
    ``metrics.json``) covers the data set's own test images, probes never included; the
    per-type table (``metrics_by_type.json``) scores each defect type and each probe kind
    against the class's good test images.

    Args:
        probes: cross-class probe kinds (:data:`snl.data.PROBE_KINDS`) to add as types.
        probe_seed: seed of the probe images (:func:`snl.data.make_probes`).
        probe_root: where the probe images are written (default ``out_dir/probes``).
        probe_count: probe images per class and kind.
        quiet: print nothing (the report files are written all the same).
        threshold: how the decision threshold is chosen (:mod:`snl.calibration`): "f1" or
            "fpr=F"; written to ``calibration.json``.
        self_check: the run's self-check (:func:`snl.selfcheck.run`): each evaluated class's
            figure becomes its ``self_check`` column (and the mean's), and the report gets
            its section.
    """
    threshold = calibration.parse_method(threshold)
    world = world or distributed.setup()
    out_dir = Path(out_dir)
    model.eval()
    norm = model.normalization
    probes = parse_kinds(list(probes))
    listing = TestDataset(data_root, classes, size=image_size, mean=norm.mean, std=norm.std)
    probe_dir = None
    if probes:
        probe_dir = Path(probe_root) if probe_root is not None else out_dir / "probes"
        if world.is_main:
            make_probes(data_root, probe_dir, listing.classes, probes, seed=probe_seed,
                        size=image_size, count=probe_count)
        distributed.barrier(world)
    per_class, by_type, curves, pro_curves, grids = {}, {}, {}, {}, {}
    all_scores, all_labels = [], []
    overlays = out_dir / "overlays"
    if world.is_main:
        overlays.mkdir(parents=True, exist_ok=True)
    for name in listing.classes:
        dataset = TestDataset(data_root, name, size=image_size, mean=norm.mean, std=norm.std)
        result = _predict_gathered(model, dataset, batch_size, world, f"eval {name}")
        probe_result = None
        if probe_dir is not None:
            probe_set = TestDataset(probe_dir, name, size=image_size, mean=norm.mean,
                                    std=norm.std)
            probe_result = _predict_gathered(model, probe_set, batch_size, world,
                                             f"probes {name}")
        if not world.is_main:
            continue
        scores, maps, masks, labels = result
        per_class[name] = metrics.evaluate(scores.numpy(), labels.numpy(), maps.numpy(),
                                           masks.numpy())
        if name in selfcheck.figures(self_check):
            per_class[name]["self_check"] = selfcheck.figures(self_check)[name]
        curves[name] = (scores.numpy(), labels.numpy())
        all_scores.append(scores.numpy())
        all_labels.append(labels.numpy())
        _write_overlays(overlays, name, dataset, scores, maps, masks, labels)
        grids[name] = (grid_rows(dataset, scores, maps, masks, labels),
                       *((float(maps.min()), float(maps.max())) if maps.numel() else (0, 1)))
        if labels.any() and masks.any():
            pro_curves[name] = metrics.pro_curve(maps.numpy(), masks.numpy(), points=300)
        defects = [s.defect for s in dataset.samples]
        if probe_result is not None:
            scores, maps, masks, labels = (torch.cat(pair) for pair in
                                           zip(result, probe_result, strict=True))
            defects += [s.defect for s in probe_set.samples]
        by_type[name] = per_type_metrics(scores.numpy(), labels.numpy(), maps.numpy(),
                                         masks.numpy(), defects)
    table = report.with_mean(per_class)
    calibrated = None
    if world.is_main:
        calibrated = calibration.calibrate(np.concatenate(all_scores),
                                           np.concatenate(all_labels), threshold).to_dict()
    if by_type:
        by_type["mean"] = _mean_by_type(by_type)
    if world.is_main:
        report.write_json(out_dir / "metrics.json", table)
        report.write_json(out_dir / "metrics_by_type.json", by_type)
        report.write_json(out_dir / "calibration.json", calibrated)
        if self_check:
            selfcheck.write(out_dir, self_check)
        report.plot_roc(out_dir / "roc.png", curves)
        roc_points = {name: report.roc_curve(*pair) for name, pair in curves.items()
                      if pair[1].min() != pair[1].max()}
        report.write_json(out_dir / "curves.json", curves_json(roc_points, pro_curves))
        write_html(out_dir / "report.html", "SNL evaluation", table, by_type, roc_points,
                   pro_curves, grids, calibrated, config or {}, probes, self_check)
        extra = [*([*selfcheck.markdown_section(self_check), ""] if self_check else []),
                 "## Per defect type", "",
                 "Each type's images against the class's good test images"
                 + (f"; cross-class probes: {', '.join(probes)} (seed {probe_seed}, "
                    f"images in `{probe_dir}`)" if probes else "") + ".", "",
                 report.markdown_table(_flat_types(by_type)), "",
                 "![image-level ROC](roc.png)", "",
                 "Anomaly-map overlays (white outline: ground truth) are in `overlays/`; "
                 "`report.html` shows every class's images with their maps, the misses "
                 "included, and the ROC and PRO curves."]
        report.write_report(out_dir / "report.md", "SNL evaluation", table, config or {},
                            extra=extra)
        if not quiet:
            print(report.markdown_table(table), flush=True)
            if probes:
                print(report.markdown_table(_flat_types(by_type)), flush=True)
            print(f"report: {out_dir / 'report.md'} and {out_dir / 'report.html'}", flush=True)
    return Evaluation(table, by_type, calibrated)


def grid_rows(dataset, scores, maps, masks, labels) -> list[html_report.GridRow]:
    """The images of one class's grid in ``report.html`` (:func:`snl.html_report.pick_rows`),
    originals read again from their files at display size."""
    size = max(html_report.DISPLAY, *dataset.size)
    rows = []
    for i, group in html_report.pick_rows(scores.numpy(), labels.numpy()):
        sample = dataset.samples[i]
        rows.append(html_report.GridRow(
            name=f"{sample.defect}/{sample.path.name}", group=group, defect=sample.defect,
            score=float(scores[i]),
            image=resized_rgb(sample.path, (size, size)), amap=maps[i].numpy(),
            mask=masks[i].numpy(), label=int(labels[i])))
    return rows


def curves_json(roc: dict, pro: dict) -> dict:
    """The ROC (per image) and PRO (resampled) curves' points, per class, as lists."""
    def points(pair):
        return {"fpr": [round(float(v), 6) for v in pair[0]],
                "y": [round(float(v), 6) for v in pair[1]]}
    return {"roc": {name: points(pair) for name, pair in roc.items()},
            "pro": {name: points(pair) for name, pair in pro.items()}}


def write_html(path: Path, title: str, table: dict, by_type: dict, roc: dict, pro: dict,
               grids: dict[str, tuple[list[html_report.GridRow], float, float]],
               calibrated: dict | None, config: dict, probes: Sequence[str] = (),
               self_check: dict | None = None) -> Path:
    """``report.html`` of an evaluation (:mod:`snl.html_report`): ``grids[class]`` is the
    class's rows and its colour scale's bottom and top; ``self_check`` adds its section."""
    h = html_report
    threshold = calibrated["threshold"] if calibrated else None
    intro = (f"{len(grids)} classes; metrics in percent; each class's good test images "
             "against its defect images")
    if threshold is not None:
        intro += (f"; decision threshold {threshold:.4g} on the image score "
                  f"({calibrated.get('method', '')})")
    sections = [h.paragraph(intro + "."),
                h.section("Per class", h.metrics_table(table)),
                *([selfcheck.html_section(self_check)] if self_check else []),
                h.section("Per defect type",
                          h.paragraph("Each type's images against the class's good test images"
                                      + (f"; cross-class probes: {', '.join(probes)}"
                                         if probes else "") + "."),
                          h.metrics_table(_flat_types(by_type), first="class / type")),
                h.section("Curves", '<div class="curves">' + h.img_tag(h.curves_png(
                    roc, "image-level ROC", "false positive rate", "true positive rate",
                    diagonal=True), "image-level ROC curves") + h.img_tag(h.curves_png(
                        pro, "PRO up to FPR 0.3",
                        "false positive rate (normal pixels)", "per-region overlap",
                        xlim=0.3), "PRO curves") + "</div>")]
    for name, (rows, vmin, vmax) in grids.items():
        sections.append(h.section(
            f"Class {name}",
            h.paragraph("Highest-scored defects, then the misses: lowest-scored defects and "
                        "highest-scored good images. Colour scale from the class's smallest to its "
                        "largest map value; white in the ground truth is the defect."),
            h.grid(rows, vmin, vmax, threshold), level=3))
    return h.write(path, h.page(title, sections, config))


def _flat_types(by_type: dict) -> dict:
    """``{"class / type": row}``, for one markdown table."""
    return {f"{name} / {kind}": row for name, types in by_type.items()
            for kind, row in types.items()}


def evaluate(model, data_root: str | os.PathLike, classes: str | list[str], image_size: int,
             out_dir: str | os.PathLike, world: distributed.World | None = None,
             config: dict[str, Any] | None = None, batch_size: int = 16,
             probes: Sequence[str] = (), probe_seed: int = 0) -> dict:
    """Per-class metrics of ``model`` on each class's test set; writes the report on rank 0.

    :func:`evaluate_all` with its per-type table left out (it is in
    ``metrics_by_type.json``).

    Returns:
        ``{class: {metric: value}, ..., "mean": {...}}`` (on rank 0; empty elsewhere).
    """
    return evaluate_all(model, data_root, classes, image_size, out_dir, world, config,
                        batch_size, probes=probes, probe_seed=probe_seed).table


def resized_rgb(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """The image file at ``path`` as (H, W, 3) uint8 RGB resized to ``size`` = (H, W)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR))


def _write_overlays(folder: Path, name: str, dataset, scores, maps, masks, labels) -> None:
    """Overlays of the highest-scoring defect images and the highest-scoring good ones."""
    vmax = float(maps.max()) if maps.numel() else 1.0
    picked = []
    for label in (1, 0):
        candidates = [i for i in torch.argsort(scores, descending=True).tolist()
                      if int(labels[i]) == label]
        picked += candidates[: OVERLAYS_PER_CLASS // 2]
    for i in picked:
        sample = dataset.samples[i]
        rgb = report.overlay(resized_rgb(sample.path, dataset.size), maps[i].numpy(), vmax,
                             masks[i].numpy().astype(bool))
        report.save_png(folder / f"{name}_{sample.defect}_{sample.path.stem}.png", rgb)
