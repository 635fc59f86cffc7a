"""``snl eval`` and the evaluation after training: per-class metrics, report, ROC, overlays.

Evaluation writes ``metrics.json``, ``report.md``, ``roc.png`` and ``overlays/*.png`` to its
folder. Under ``torchrun`` every process predicts its shard of each class's test set; the
shards are gathered and rank 0 scores and writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import distributed, metrics, report
from ..data import TestDataset
from .console import progress

OVERLAYS_PER_CLASS = 4


@torch.no_grad()
def _predict_set(model, dataset: TestDataset, indices: Sequence[int], batch_size: int,
                 world: distributed.World, desc: str):
    scores, maps, masks, labels = [], [], [], []
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size)
    for batch in progress(loader, world, desc=desc):
        s, m = model.predict(batch["image"].to(world.device))
        scores.append(s.float().cpu())
        maps.append(m[:, 0].float().cpu())
        masks.append(batch["mask"][:, 0].to(torch.uint8))
        labels.append(torch.as_tensor(batch["label"]))
    if not scores:
        size = dataset.size
        return (torch.zeros(0), torch.zeros(0, *size), torch.zeros(0, *size, dtype=torch.uint8),
                torch.zeros(0, dtype=torch.long))
    return torch.cat(scores), torch.cat(maps), torch.cat(masks), torch.cat(labels)


def evaluate(model, data_root: str | os.PathLike, classes: str | list[str], image_size: int,
             out_dir: str | os.PathLike, world: distributed.World | None = None,
             config: dict[str, Any] | None = None, batch_size: int = 16) -> dict:
    """Per-class metrics of ``model`` on each class's test set; writes the report on rank 0.

    Each process predicts its shard of every class (images i with i % world == rank); the
    shards are gathered, so rank 0 scores the whole test set.

    Returns:
        ``{class: {metric: value}, ..., "mean": {...}}`` (on every rank).
    """
    world = world or distributed.setup()
    out_dir = Path(out_dir)
    model.eval()
    norm = model.normalization
    probe = TestDataset(data_root, classes, size=image_size, mean=norm.mean, std=norm.std)
    per_class, curves = {}, {}
    overlays = out_dir / "overlays"
    if world.is_main:
        overlays.mkdir(parents=True, exist_ok=True)
    for name in probe.classes:
        dataset = TestDataset(data_root, name, size=image_size, mean=norm.mean, std=norm.std)
        mine = range(world.rank, len(dataset), world.size)
        local = _predict_set(model, dataset, mine, batch_size, world, f"eval {name}")
        order = torch.tensor(list(mine), dtype=torch.long)
        gathered = [distributed.gather_cat(world, t) for t in (*local, order)]
        if not world.is_main:
            continue
        scores, maps, masks, labels, index = gathered
        rank_order = torch.argsort(index)
        scores, maps, masks, labels = (t[rank_order] for t in (scores, maps, masks, labels))
        per_class[name] = metrics.evaluate(scores.numpy(), labels.numpy(), maps.numpy(),
                                           masks.numpy())
        curves[name] = (scores.numpy(), labels.numpy())
        _write_overlays(overlays, name, dataset, scores, maps, masks, labels)
    table = report.with_mean(per_class)
    if world.is_main:
        report.write_json(out_dir / "metrics.json", table)
        report.plot_roc(out_dir / "roc.png", curves)
        report.write_report(
            out_dir / "report.md", "SNL evaluation", table, config or {},
            extra=["![image-level ROC](roc.png)", "",
                   "Anomaly-map overlays (white outline: ground truth) are in `overlays/`."])
        print(report.markdown_table(table), flush=True)
        print(f"report: {out_dir / 'report.md'}", flush=True)
    return table


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
