"""``snl predict`` and ``snl export``: a trained run's model on image files, or as ONNX."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, distributed, report
from ..data import load_image
from ..data.folders import IMAGE_EXTENSIONS
from .console import progress
from .evaluation import resized_rgb
from .training import TrainConfig, build_model


def load_run(checkpoint_path: str | os.PathLike, device: str | None = None):
    """Model and config of a checkpoint (the teacher's weights are in it: no download)."""
    state = checkpoint.load(checkpoint_path)
    world = distributed.setup(device)
    config = TrainConfig.from_saved(state["config"]).resolved(world.device)
    config.pretrained, config.weights = False, None
    model = build_model(config, world)
    model.load_state_dict(state["model"])
    model.eval()
    return model, config, world


def predict_files(checkpoint_path: str | os.PathLike, images: Sequence[str],
                  out_dir: str | os.PathLike, device: str | None = None) -> list[dict]:
    """Scores and overlay PNGs for image files; writes ``scores.json`` to ``out_dir``."""
    model, config, world = load_run(checkpoint_path, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm, size = model.normalization, config.image_size
    results, maps = [], []
    for path in progress(images, world, desc="predict"):
        if not Path(path).is_file() or Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            raise FileNotFoundError(f"not an image file: {path}")
        image = load_image(path, size, norm.mean, norm.std)[None].to(world.device)
        score, amap = model.predict(image)
        results.append({"path": str(path), "score": float(score[0])})
        maps.append(amap[0, 0].float().cpu().numpy())
    vmax = max((float(m.max()) for m in maps), default=1.0)
    for result, amap in zip(results, maps, strict=True):
        out = out_dir / f"{Path(result['path']).stem}_overlay.png"
        rgb = resized_rgb(result["path"], (size, size))
        report.save_png(out, report.overlay(rgb, amap, vmax))
        result["overlay"] = str(out)
    report.write_json(out_dir / "scores.json", results)
    return results


class _Inference(nn.Module):
    """``forward`` is ``SNL.predict``, which is what ONNX export traces."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.predict(images)


def export_onnx(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the inference model (reference ops) to ONNX: images -> (scores, maps)."""
    model, config, _ = load_run(checkpoint_path, "cpu")
    model.fused = False
    size = config.image_size
    example = torch.zeros(1, 3, size, size)
    torch.onnx.export(_Inference(model), (example,), str(out), input_names=["images"],
                      output_names=["scores", "maps"], dynamo=False,
                      dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"},
                                    "maps": {0: "batch"}})
    return Path(out)
