"""The ``snl`` command: train, evaluate, predict, export and info.

``snl train`` with no data argument makes the embedded default data set (texture photographs
shipped inside scikit-image with synthetic defects, :mod:`snl.data.textures`) and trains on
the union of its classes, then evaluates each class. Defaults depend on the device: on a
CPU a small offline-pretrained teacher (EfficientNet-Lite0), 128x128 images and few epochs,
so that the whole job finishes in minutes on two cores; on a GPU the paper's setting
(WideResNet-50-2, 256x256, Adam lr 0.005, betas (0.5, 0.999), batch 16).

A run folder holds ``config.json``, ``checkpoints/last.pt`` (written atomically after every
epoch, read with ``weights_only=True``), ``history.json``, and after evaluation
``metrics.json``, ``report.md``, ``roc.png`` and ``overlays/*.png``. ``--resume RUN`` goes
on from the last checkpoint and gives the same parameters as an uninterrupted run: the
shuffling order of epoch e depends only on (seed, e), and nothing else is random.

Under ``torchrun --nproc_per_node=N -m snl train ...`` every process trains on its shard
with ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPUs), evaluation is sharded and
gathered, and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint, distributed, metrics, report
from .data import TestDataset, TrainDataset, default_root, load_image, make_default_dataset
from .data.folders import IMAGE_EXTENSIONS

CPU_DEFAULTS = {"backbone": "tf_efficientnet_lite0", "image_size": 128, "epochs": 12}
GPU_DEFAULTS = {"backbone": "wide_resnet50_2", "image_size": 256, "epochs": 200}
OVERLAYS_PER_CLASS = 4


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in config.json and the checkpoint)."""

    data: str | None = None  #: data set folder; None: the embedded default
    classes: str = "all"  #: "all" or comma-separated class names
    backbone: str | None = None  #: None: device default
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int = 16
    lr: float = 0.005
    beta1: float = 0.5
    beta2: float = 0.999
    structure: str = "snl"
    fused: bool = True
    pretrained: bool = True
    weights: str | None = None
    num_centers: int = 16
    seed: int = 0
    workers: int = 0
    device: str | None = None

    def resolved(self, device: torch.device) -> TrainConfig:
        """Fill the device-dependent defaults."""
        defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
        values = dataclasses.asdict(self)
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        return TrainConfig(**values)

    def class_list(self) -> str | list[str]:
        return "all" if self.classes == "all" else [c for c in self.classes.split(",") if c]


class _LossModule(nn.Module):
    """DistributedDataParallel hooks ``forward``: route it to ``SNL.loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(images)


def _progress(iterable, world: distributed.World, **kwargs):
    """A tqdm progress bar on rank 0 (stderr); the bare iterable elsewhere."""
    if not world.is_main:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, file=sys.stderr, **kwargs)


def _log(world: distributed.World, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def build_model(config: TrainConfig, world: distributed.World):
    import snl

    assert config.backbone is not None
    return snl.SNL(backbone=config.backbone, pretrained=config.pretrained,
                   weights=config.weights, fused=config.fused,
                   structure=config.structure, num_centers=config.num_centers).to(world.device)


def resolve_data(config: TrainConfig, world: distributed.World) -> Path:
    """The data set folder; the embedded default is made (or found) when none is given."""
    if config.data is not None:
        return Path(config.data)
    root = default_root()
    _log(world, f"data: embedded default set (scikit-image textures) in {root}")
    make_default_dataset(root, seed=config.seed)
    return root


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
          world: distributed.World | None = None, evaluate_after: bool = True) -> nn.Module:
    """Train (or go on training) and, by default, evaluate; returns the trained model.

    Args:
        config: the run's configuration (device defaults filled here).
        run_dir: the run folder; with ``resume``, an existing one.
        resume: go on from ``run_dir/checkpoints/last.pt``.
        world: the process group (``distributed.setup()`` when None).
        evaluate_after: evaluate each class's test set at the end.
    """
    world = world or distributed.setup(config.device)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    start_epoch, history = 0, []
    state = None
    if resume:
        state = checkpoint.load(ckpt_path)
        config = TrainConfig(**state["config"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        _log(world, f"resuming {run_dir} at epoch {start_epoch}")
    config = config.resolved(world.device)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        report.write_json(run_dir / "config.json", dataclasses.asdict(config))
    torch.manual_seed(config.seed)
    data_root = resolve_data(config, world)
    model = build_model(config, world)
    norm = model.normalization
    dataset = TrainDataset(data_root, config.class_list(), size=config.image_size,
                           mean=norm.mean, std=norm.std)
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                                 shuffle=True, seed=config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.workers)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=config.lr,
                                 betas=(config.beta1, config.beta2))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    step_module: nn.Module = _LossModule(model)
    if world.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    _log(world, f"training {config.backbone} ({config.structure}, fused={config.fused}) on "
                f"{len(dataset)} images of {', '.join(dataset.classes)} at "
                f"{config.image_size}px, {config.epochs} epochs, {world.size} process(es) "
                f"on {world.device.type}")
    assert config.epochs is not None
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        started = time.perf_counter()
        bar = _progress(loader, world, desc=f"epoch {epoch + 1}/{config.epochs}")
        for images in bar:
            losses = step_module(images.to(world.device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            steps += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            if world.is_main and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}")
        distributed.broadcast_buffers(world, model)
        means = {k: v / max(steps, 1) for k, v in sums.items()}
        history.append({"epoch": epoch + 1, "seconds": time.perf_counter() - started, **means})
        _log(world, f"epoch {epoch + 1}/{config.epochs}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + f" ({history[-1]['seconds']:.0f} s)")
        if world.is_main:
            checkpoint.save_atomic({"model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(),
                                    "epoch": epoch + 1, "history": history,
                                    "config": dataclasses.asdict(config)}, ckpt_path)
            report.write_json(run_dir / "history.json", history)
        distributed.barrier(world)
    if evaluate_after:
        evaluate(model, data_root, config.class_list(), config.image_size, run_dir, world,
                 dataclasses.asdict(config))
    return model


@torch.no_grad()
def _predict_set(model, dataset: TestDataset, indices: Sequence[int], batch_size: int,
                 world: distributed.World, desc: str):
    scores, maps, masks, labels = [], [], [], []
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size)
    for batch in _progress(loader, world, desc=desc):
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


def _denormalize(dataset, index: int) -> np.ndarray:
    from PIL import Image

    image = Image.open(dataset.samples[index].path).convert("RGB")
    return np.asarray(image.resize(dataset.size[::-1], Image.BILINEAR))


def _write_overlays(folder: Path, name: str, dataset, scores, maps, masks, labels) -> None:
    """Overlays of the highest-scoring defect images and the highest-scoring good ones."""
    vmax = float(maps.max()) if maps.numel() else 1.0
    picked = []
    for label in (1, 0):
        candidates = [i for i in torch.argsort(scores, descending=True).tolist()
                      if int(labels[i]) == label]
        picked += candidates[: OVERLAYS_PER_CLASS // 2]
    for i in picked:
        rgb = report.overlay(_denormalize(dataset, i), maps[i].numpy(), vmax,
                             masks[i].numpy().astype(bool))
        sample = dataset.samples[i]
        report.save_png(folder / f"{name}_{sample.defect}_{sample.path.stem}.png", rgb)


def load_run(checkpoint_path: str | os.PathLike, device: str | None = None):
    """Model and config of a checkpoint (the teacher's weights are in it: no download)."""
    state = checkpoint.load(checkpoint_path)
    world = distributed.setup(device)
    config = TrainConfig(**state["config"]).resolved(world.device)
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
    for path in _progress(images, world, desc="predict"):
        if not Path(path).is_file() or Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            raise FileNotFoundError(f"not an image file: {path}")
        image = load_image(path, size, norm.mean, norm.std)[None].to(world.device)
        score, amap = model.predict(image)
        results.append({"path": str(path), "score": float(score[0])})
        maps.append(amap[0, 0].float().cpu().numpy())
    vmax = max((float(m.max()) for m in maps), default=1.0)
    from PIL import Image

    for result, amap in zip(results, maps, strict=True):
        rgb = np.asarray(Image.open(result["path"]).convert("RGB").resize((size, size),
                                                                          Image.BILINEAR))
        out = out_dir / f"{Path(result['path']).stem}_overlay.png"
        report.save_png(out, report.overlay(rgb, amap, vmax))
        result["overlay"] = str(out)
    report.write_json(out_dir / "scores.json", results)
    return results


class _Inference(nn.Module):
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (and evaluate) a model")
    t.add_argument("--data", help="data set folder (MVTec AD or VisA 1-class layout); "
                                  "default: the embedded texture set")
    t.add_argument("--dataset", choices=("mvtec", "visa"), default="mvtec",
                   help="folder layout (both are read by the same reader)")
    t.add_argument("--classes", default="all", help="'all' or comma-separated class names")
    t.add_argument("--backbone", help=f"timm teacher (CPU default {CPU_DEFAULTS['backbone']}, "
                                      f"GPU {GPU_DEFAULTS['backbone']})")
    t.add_argument("--image-size", type=int, help="side in pixels, a multiple of 32 "
                                                  "(CPU default 128, GPU 256)")
    t.add_argument("--epochs", type=int, help="CPU default 12, GPU 200")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=0.005)
    t.add_argument("--structure", choices=("snl", "rd"), default="snl")
    t.add_argument("--reference", action="store_true", help="plain-PyTorch ops (fused=False)")
    t.add_argument("--no-pretrained", action="store_true", help="random teacher (tests only)")
    t.add_argument("--weights", help="teacher weights file (timm or torchvision names)")
    t.add_argument("--num-centers", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help="data loader processes")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--out", default="runs", help="parent folder of run folders")
    t.add_argument("--name", help="run folder name (default: a timestamp)")
    t.add_argument("--resume", metavar="RUN_DIR", help="go on with an interrupted run")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a data set")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="data set folder (default: the embedded texture set)")
    e.add_argument("--dataset", choices=("mvtec", "visa"), default="mvtec")
    e.add_argument("--classes", default="all")
    e.add_argument("--out", help="output folder (default: beside the checkpoint's run)")
    e.add_argument("--device")

    r = sub.add_parser("predict", help="score image files and write map overlays")
    r.add_argument("checkpoint")
    r.add_argument("images", nargs="+")
    r.add_argument("--out", default="predictions")
    r.add_argument("--device")

    x = sub.add_parser("export", help="export the inference model to ONNX")
    x.add_argument("checkpoint")
    x.add_argument("--onnx", required=True, metavar="OUT")

    sub.add_parser("info", help="versions, device and kernel backends")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from snl_kernels.__main__ import report as kernels_report

        print(kernels_report())
        return 0
    if args.command == "train":
        config = TrainConfig(
            data=args.data, classes=args.classes, backbone=args.backbone,
            image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, structure=args.structure, fused=not args.reference,
            pretrained=not args.no_pretrained, weights=args.weights,
            num_centers=args.num_centers, seed=args.seed, workers=args.workers,
            device=args.device)
        world = distributed.setup(args.device)
        try:
            if args.resume:
                train(config, args.resume, resume=True, world=world)
            else:
                name = args.name or time.strftime("%Y%m%d-%H%M%S")
                run_dir = Path(args.out) / name
                if world.is_main and (run_dir / "checkpoints" / "last.pt").exists():
                    raise SystemExit(f"snl: {run_dir} already holds a run; use --resume "
                                     f"{run_dir} or another --name")
                train(config, run_dir, world=world)
        finally:
            distributed.teardown(world)
        return 0
    if args.command == "eval":
        model, config, world = load_run(args.checkpoint, args.device)
        data = Path(args.data) if args.data else resolve_data(
            dataclasses.replace(config, data=None), world)
        out = Path(args.out) if args.out else Path(args.checkpoint).parent.parent / "eval"
        table = evaluate(model, data, "all" if args.classes == "all" else args.classes.split(","),
                         config.image_size, out, world, dataclasses.asdict(config))
        return 0 if all(not math.isnan(v) for row in table.values() for v in row.values()) else 1
    if args.command == "predict":
        for result in predict_files(args.checkpoint, args.images, args.out, args.device):
            print(f"{result['score']:.6f}  {result['path']}")
        return 0
    if args.command == "export":
        print(export_onnx(args.checkpoint, args.onnx))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())

