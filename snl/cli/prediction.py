"""``snl predict`` and ``snl export``: a trained run's model on image files, or as ONNX.

``snl predict`` writes ``scores.json``, an overlay PNG per image and ``report.html``: the
scores (raw, normalised, label) of every image and, for the :data:`MAX_GRID_ROWS`
highest-scored ones, original | anomaly map with its colour scale | overlay, as the
evaluation's report shows them (:mod:`snl.html_report`).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, distributed, html_report, report
from ..calibration import Calibration
from ..data import load_image
from ..data.folders import IMAGE_EXTENSIONS
from .console import progress
from .evaluation import resized_rgb
from .training import TrainConfig, build_model

#: Images shown in the grid of ``snl predict``'s report.html (the highest-scored ones); the
#: table lists every image.
MAX_GRID_ROWS = 48


def load_run(checkpoint_path: str | os.PathLike, device: str | None = None,
             precision: str | None = None):
    """Model and config of a checkpoint (the teacher's weights are in it: no download);
    ``precision`` ("fp32", "bf16") replaces the one it was trained in."""
    model, config, world, _ = load_calibrated_run(checkpoint_path, device, precision)
    return model, config, world


def load_calibrated_run(checkpoint_path: str | os.PathLike, device: str | None = None,
                        precision: str | None = None):
    """:func:`load_run` and the checkpoint's :class:`Calibration` (None if never evaluated)."""
    state = checkpoint.load(checkpoint_path)
    world = distributed.setup(device)
    config = TrainConfig.from_saved(state["config"]).resolved(world.device)
    if precision is not None:
        config.precision = precision
    config.pretrained, config.weights = False, None
    model = build_model(config, world)
    model.load_state_dict(state["model"])
    model.eval()
    return model, config, world, Calibration.from_dict(state.get("calibration"))


def predict_files(checkpoint_path: str | os.PathLike, images: Sequence[str],
                  out_dir: str | os.PathLike, device: str | None = None,
                  precision: str | None = None) -> list[dict]:
    """Scores and overlay PNGs for image files; writes ``scores.json`` to ``out_dir``."""
    model, config, world, calibrated = load_calibrated_run(checkpoint_path, device, precision)
    bad = [str(p) for p in images
           if not Path(p).is_file() or Path(p).suffix.lower() not in IMAGE_EXTENSIONS]
    if bad:  # all of them, before the progress bar starts
        raise FileNotFoundError(f"not an image file: {', '.join(bad)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm, size = model.normalization, config.image_size
    results, maps = [], []
    for path in progress(images, world, desc="predict"):
        image = load_image(path, size, norm.mean, norm.std)[None].to(world.device)
        score, amap = model.predict(image)
        result = {"path": str(path), "score": float(score[0])}
        if calibrated is not None:
            result["normalised"] = float(calibrated.normalise(result["score"]))
            result["label"] = calibrated.label(result["score"])
            result["threshold"] = calibrated.threshold
        results.append(result)
        maps.append(amap[0, 0].float().cpu().numpy())
    vmax = max((float(m.max()) for m in maps), default=1.0)
    for result, amap in zip(results, maps, strict=True):
        out = out_dir / f"{Path(result['path']).stem}_overlay.png"
        rgb = resized_rgb(result["path"], (size, size))
        report.save_png(out, report.overlay(rgb, amap, vmax))
        result["overlay"] = str(out)
    report.write_json(out_dir / "scores.json", results)
    write_html(out_dir / "report.html", results, maps, calibrated, str(checkpoint_path))
    return results


def write_html(path: Path, results: list[dict], maps: list, calibrated: Calibration | None,
               source: str) -> Path:
    """``snl predict``'s report.html: every image's scores, and a grid of the highest-scored."""
    import html

    import numpy as np

    h = html_report
    threshold = calibrated.threshold if calibrated is not None else None
    head = "<tr><th>image</th><th>score</th>" + (
        "<th>normalised</th><th>label</th>" if calibrated is not None else "") + "</tr>"
    lines = ['<table class="metrics">', head]
    order = sorted(range(len(results)), key=lambda i: -results[i]["score"])
    for i in order:
        r = results[i]
        cells = f"<td>{html.escape(r['path'])}</td><td>{r['score']:.4g}</td>"
        if calibrated is not None:
            cells += f"<td>{r['normalised']:.3f}</td><td>{html.escape(str(r['label']))}</td>"
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    shown = order[:MAX_GRID_ROWS]
    rows = [h.GridRow(name=Path(results[i]["path"]).name, group=f"rank {rank + 1}", defect="",
                      score=results[i]["score"],
                      image=resized_rgb(results[i]["path"], (h.DISPLAY, h.DISPLAY)),
                      amap=maps[i]) for rank, i in enumerate(shown)]
    values = np.concatenate([m.reshape(-1) for m in maps]) if maps else np.zeros(1)
    intro = (f"{len(results)} images scored with {source}"
             + (f"; decision threshold {threshold:.4g} (normalised score 0.5, label 1 = "
                "anomalous at or above it)" if threshold is not None
                else "; the checkpoint has no stored threshold (run snl eval to store one)"))
    sections = [h.paragraph(intro + "."), h.section("Scores", "\n".join(lines))]
    if rows:
        sections.append(h.section(
            "Images", h.paragraph(f"The {len(rows)} highest-scored images; colour scale from "
                                  "the smallest to the largest map value of all images."),
            h.grid(rows, float(values.min()), float(values.max()), threshold)))
    return h.write(path, h.page("SNL predictions", sections))


class _Inference(nn.Module):
    """``forward`` is ``SNL.predict`` (and, with a calibration, the normalised scores and the
    labels), which is what ONNX export traces."""

    def __init__(self, model, calibrated: Calibration | None = None) -> None:
        super().__init__()
        self.model = model
        self.calibrated = calibrated

    def forward(self, images: torch.Tensor):
        scores, maps = self.model.predict(images)
        if self.calibrated is None:
            return scores, maps
        labels = (scores >= self.calibrated.threshold).to(torch.int64)
        return scores, maps, self.calibrated.normalise(scores), labels


def export_onnx(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the inference model (reference ops) to ONNX: images -> (scores, maps), and with
    a stored calibration also ``normalised`` (0.5 at the threshold) and ``labels`` (1 =
    anomalous).

    Raises:
        ModuleNotFoundError: ``onnx`` (the ``export`` extra) is not installed; checked before
            the checkpoint is read or anything is traced.
        IsADirectoryError, NotADirectoryError: ``out`` is a folder, or its folder is not one.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ModuleNotFoundError(
            "snl export needs the onnx package, which is not installed: "
            'pip install "snl-kernels[export]"', name="onnx")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--onnx {out} is a folder; give the file to write")
    if not out.parent.is_dir():
        raise NotADirectoryError(f"--onnx {out}: the folder {out.parent} does not exist")
    model, config, _, calibrated = load_calibrated_run(checkpoint_path, "cpu")
    model.fused = False
    size = config.image_size
    example = torch.zeros(1, 3, size, size)
    names = ["scores", "maps"] + (["normalised", "labels"] if calibrated is not None else [])
    # The tracer warns about every Python bool and int taken from a tensor (shape checks,
    # the blur's kernel size); they are constants of this export, not errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(_Inference(model, calibrated), (example,), str(out),
                          input_names=["images"], output_names=names, dynamo=False,
                          dynamic_axes={"images": {0: "batch"},
                                        **{n: {0: "batch"} for n in names}})
    return out
