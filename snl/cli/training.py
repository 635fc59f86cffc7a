"""``snl train``: the run's configuration, the model it builds and the training loop.

A run folder holds ``config.json``, ``checkpoints/last.pt`` (written atomically after every
epoch, read with ``weights_only=True``), ``history.json`` and, with the self-check on (the
default), ``self_check.json``; evaluation at the end adds its report
(:mod:`snl.cli.evaluation`). ``resume=True`` goes on from the last checkpoint and gives the
same parameters as an uninterrupted run: the shuffling order of epoch e depends only on
(seed, e), and nothing else is random.

The self-check (:mod:`snl.selfcheck`): before training, part of each class's normal
training images is held out (:func:`snl.data.split_holdout`; the same files for every
training seed) and never trained on; after the last epoch the model scores them against
cut-paste probes made from them, and a class whose probe image AUROC is below
:data:`snl.selfcheck.FLAG_BELOW` gets a one-line warning.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import checkpoint, distributed, report, selfcheck
from ..data import (
    HOLDOUT_MIN,
    TrainDataset,
    check_dataset,
    default_root,
    make_default_dataset,
    split_holdout,
)
from ..loss import DEFAULT_COMPACT_NORM, DEFAULT_CRAM_TAU, LossWeights
from .console import log, progress
from .evaluation import evaluate_all

CPU_DEFAULTS = {"backbone": "tf_efficientnet_lite0", "image_size": 128, "epochs": 12}
GPU_DEFAULTS = {"backbone": "wide_resnet50_2", "image_size": 256, "epochs": 200}


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
    # SNL's loss (docs/model.md §1; ignored by structure "rd"): the term weights and how CRAM's
    # compactness is normalised.
    w_ch: float = LossWeights.w_ch
    w_sp: float = LossWeights.w_sp
    w_intra: float = LossWeights.w_intra
    w_inter: float = LossWeights.w_inter
    w_c: float = LossWeights.w_c
    w_rd: float = LossWeights.w_rd
    compact_norm: str = DEFAULT_COMPACT_NORM
    residual_ratio: int = 1  #: CRAM's residual path narrowed to D / residual_ratio channels
    cram_tau: str = DEFAULT_CRAM_TAU  #: CRAM's initial temperature: D ("dim") or sqrt(D)
    seed: int = 0  #: training seed (initialisation, shuffling)
    #: seed of the embedded default data set; None: ``seed`` (the data set follows the
    #: training seed, as before this option existed)
    data_seed: int | None = None
    #: data loader processes; None: 0 on a CPU, min(8, the CPUs) on a GPU
    workers: int | None = None
    device: str | None = None
    #: hold out part of each class's training images and score them against cut-paste probes
    #: after training (:mod:`snl.selfcheck`); the held-out images are never trained on
    self_check: bool = True
    #: least number of training images held out per class (see snl.data.holdout)
    holdout: int = HOLDOUT_MIN
    #: "fp32", "bf16" (the networks under bf16 autocast, snl.SNL's precision) or "auto":
    #: bf16 on a GPU, fp32 on a CPU
    precision: str = "auto"
    #: training batches in page-locked memory, copied to a GPU without blocking (GPU only)
    pin_memory: bool = True
    #: the training step's forward (and so its backward) compiled with ``torch.compile``;
    #: the fused loss stays one op in the compiled graph
    compile: bool = False
    #: the networks' weights and the training batches in channels-last memory (NHWC): on a
    #: CPU, a faster step; not yet timed on a GPU (the kernels' performance model counts
    #: NCHW features)
    channels_last: bool = False

    def resolved(self, device: torch.device) -> TrainConfig:
        """Fill the device-dependent defaults."""
        defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
        values = dataclasses.asdict(self)
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        values["precision"] = resolved_precision(values["precision"], device)
        if values["workers"] is None:
            values["workers"] = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        return TrainConfig(**values)

    @classmethod
    def from_saved(cls, values: dict) -> TrainConfig:
        """The config saved in a checkpoint. One saved before the loss options existed was
        trained with the first formulation (docs/model.md §1, "v1"), which fills them; one saved
        before the self-check existed trained on every image (``self_check`` False), and one
        saved before the precision option in fp32."""
        before = {**V1_FORMULATION, **BEFORE_SELF_CHECK, **BEFORE_PRECISION}
        missing = {k: v for k, v in before.items() if k not in values}
        return cls(**{**values, **missing})

    def class_list(self) -> str | list[str]:
        return "all" if self.classes == "all" else [c for c in self.classes.split(",") if c]


class _LossModule(nn.Module):
    """DistributedDataParallel hooks ``forward``: route it to ``SNL.loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(images)


def build_model(config: TrainConfig, world: distributed.World):
    """The ``snl.SNL`` model that ``config`` describes, on this process's device."""
    import snl

    assert config.backbone is not None
    return snl.SNL(backbone=config.backbone, pretrained=config.pretrained,
                   weights=config.weights, fused=config.fused,
                   structure=config.structure, num_centers=config.num_centers,
                   precision=resolved_precision(config.precision, world.device),
                   **formulation(config)).to(world.device)


def resolved_precision(precision: str, device: torch.device) -> str:
    """``precision``, "auto" made bf16 on a GPU and fp32 on a CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


#: The loss options of the first formulation (docs/model.md §1), which checkpoints written before
#: these options existed were trained with.
V1_FORMULATION = {"w_ch": 1.0, "w_sp": 1.0, "w_intra": 1.0, "w_inter": 1.0, "w_c": 0.1,
                  "w_rd": 0.0, "compact_norm": "sum", "residual_ratio": 1, "cram_tau": "dim"}
#: What a config saved before the self-check existed ran with: no image held out.
BEFORE_SELF_CHECK = {"self_check": False, "holdout": HOLDOUT_MIN}
#: What a config saved before the precision option ran with.
BEFORE_PRECISION = {"precision": "fp32"}
FORMULATION_FIELDS = ("w_ch", "w_sp", "w_intra", "w_inter", "w_c", "w_rd", "compact_norm",
                      "residual_ratio", "cram_tau")


def formulation(config: TrainConfig) -> dict[str, float | str]:
    """The ``snl.SNL`` keyword arguments of SNL's loss that ``config`` sets."""
    return {name: getattr(config, name) for name in FORMULATION_FIELDS}


def default_data_root(data_seed: int) -> Path:
    """Folder of the embedded default set made with ``data_seed``: seed 0 in
    :func:`snl.data.default_root`, others beside it (``textures-seed<N>``), so that sets of
    several seeds live side by side."""
    root = default_root()
    return root if data_seed == 0 else root.with_name(f"{root.name}-seed{data_seed}")


def resolve_data(config: TrainConfig, world: distributed.World) -> Path:
    """The data set folder; the embedded default is made (or found) when none is given.

    The default set's seed is ``config.data_seed``, or ``config.seed`` when that is None.
    """
    if config.data is not None:
        return Path(config.data)
    data_seed = config.seed if config.data_seed is None else config.data_seed
    root = default_data_root(data_seed)
    log(world, f"data: embedded default set (scikit-image textures) in {root}")
    make_default_dataset(root, seed=data_seed)
    return root


def training_data_root(config: TrainConfig) -> Path:
    """The data set folder ``config`` trains on (:func:`resolve_data` without making it)."""
    if config.data is not None:
        return Path(config.data)
    return default_data_root(config.seed if config.data_seed is None else config.data_seed)


class Fitted(NamedTuple):
    """What :func:`fit` returns."""

    model: nn.Module  #: the trained model
    config: TrainConfig  #: the run's configuration, device defaults filled
    data_root: Path  #: the data set folder
    self_check: dict | None  #: :func:`snl.selfcheck.run`'s result; None when it is off


def fit(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
        world: distributed.World | None = None, check_test: bool = True) -> Fitted:
    """Train (or go on training) and run the self-check; no evaluation on test images.

    Args:
        config: the run's configuration (device defaults filled here).
        run_dir: the run folder; with ``resume``, an existing one.
        resume: go on from ``run_dir/checkpoints/last.pt``.
        world: the process group (``distributed.setup()`` when None).
        check_test: check the test images' files too before the first epoch (the training
            images are always checked).

    Raises:
        ValueError: ``config.holdout`` below 1 with the self-check on.
    """
    world = world or distributed.setup(config.device)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    start_epoch, history = 0, []
    state = None
    if resume:
        state = checkpoint.load(ckpt_path)
        config = TrainConfig.from_saved(state["config"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        log(world, f"resuming {run_dir} at epoch {start_epoch}")
    config = config.resolved(world.device)
    if config.self_check and config.holdout < 1:
        raise ValueError(f"holdout must be >= 1 training images per class, got "
                         f"{config.holdout} (switch the self-check off instead)")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        report.write_json(run_dir / "config.json", dataclasses.asdict(config))
    torch.manual_seed(config.seed)
    data_root = resolve_data(config, world)
    model = build_model(config, world)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the parameters stay
    norm = model.normalization
    holdout = (split_holdout(data_root, config.class_list(), config.holdout)
               if config.self_check else None)
    dataset = TrainDataset(data_root, config.class_list(), size=config.image_size,
                           mean=norm.mean, std=norm.std,
                           exclude=holdout.excluded() if holdout else ())
    if start_epoch < config.epochs:
        # Every file is checked before the first step: a bad one stops the run here, with
        # the list of all of them, not mid-epoch.
        check_dataset(data_root, config.class_list(), train=True, test=check_test)
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                                 shuffle=True, seed=config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.workers, persistent_workers=config.workers > 0,
                        pin_memory=config.pin_memory and world.device.type == "cuda")
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=config.lr,
                                 betas=(config.beta1, config.beta2))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    step_module: nn.Module = _LossModule(model)
    if config.compile:
        step_module = compiled(step_module)
    if world.distributed:
        # Gradients as views of the all-reduce buckets: no copy into and out of the buckets
        # each step. The parameters' gradients keep the parameters' (contiguous) strides, as
        # the bucket views do, so DDP has no layout to fix up.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    log(world, f"training {config.backbone} ({config.structure}, fused={config.fused}, "
               f"{config.precision}{', compiled' if config.compile else ''}"
               f"{', channels-last' if config.channels_last else ''}) on "
               f"{len(dataset)} images of {', '.join(dataset.classes)} at "
               f"{config.image_size}px, {config.epochs} epochs, {world.size} process(es) "
               f"on {world.device.type}")
    if holdout is not None:
        log(world, "self-check: held out of training (per class): " + ", ".join(
            f"{name} {len(paths)} of {holdout.counts[name]}"
            for name, paths in holdout.held.items()))
    assert config.epochs is not None
    for epoch in range(start_epoch, config.epochs):
        _epoch(epoch, config, model, step_module, loader, sampler, optimizer, world, history)
        if world.is_main:
            checkpoint.save_atomic({"model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(),
                                    "epoch": epoch + 1, "history": history,
                                    "config": dataclasses.asdict(config)}, ckpt_path)
            report.write_json(run_dir / "history.json", history)
        distributed.barrier(world)
    check = None
    if holdout is not None:
        check = selfcheck.run(model, holdout, config.image_size, world.device, root=data_root)
        if world.is_main:
            selfcheck.write(run_dir, check)
        log(world, selfcheck.summary_line(check))
    return Fitted(model, config, data_root, check)


#: ``torch.compile``'s options for ``--compile`` (Inductor by default).
COMPILE_OPTIONS: dict = {}


def compiled(module: nn.Module) -> nn.Module:
    """``module`` compiled with ``torch.compile`` (the first steps of each shape compile)."""
    return torch.compile(module, **COMPILE_OPTIONS)


#: Least seconds between two updates of the training progress bar's loss (each one waits
#: for the GPU).
PROGRESS_SECONDS = 1.0


def _epoch(epoch: int, config: TrainConfig, model, step_module: nn.Module, loader, sampler,
           optimizer, world: distributed.World, history: list[dict]) -> None:
    """One epoch of training; appends its mean losses and seconds to ``history``."""
    sampler.set_epoch(epoch)
    model.train()
    # The losses are summed on the device (in float64, as Python floats were): reading one
    # (float()) waits for the GPU to finish the step, so the host could not queue the next
    # step's launches while it runs. The progress bar reads the total at most once a second.
    keys: list[str] = []
    sums = None
    steps = 0
    started = shown = time.perf_counter()
    bar = progress(loader, world, desc=f"epoch {epoch + 1}/{config.epochs}")
    layout = torch.channels_last if config.channels_last else torch.preserve_format
    for images in bar:
        losses = step_module(images.to(world.device, non_blocking=True, memory_format=layout))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        steps += 1
        if sums is None:
            keys = list(losses)
        values = torch.stack([losses[k].detach() for k in keys]).double()
        sums = values if sums is None else sums + values
        if (world.is_main and hasattr(bar, "set_postfix")
                and time.perf_counter() - shown >= PROGRESS_SECONDS):
            bar.set_postfix(loss=f"{float(values[keys.index('total')]):.3f}")
            shown = time.perf_counter()
    distributed.broadcast_buffers(world, model)
    totals = [] if sums is None else sums.tolist()
    means = {k: v / max(steps, 1) for k, v in zip(keys, totals, strict=True)}
    history.append({"epoch": epoch + 1, "seconds": time.perf_counter() - started, **means})
    log(world, f"epoch {epoch + 1}/{config.epochs}: "
               + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
               + f" ({history[-1]['seconds']:.0f} s)")


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
          world: distributed.World | None = None, evaluate_after: bool = True) -> nn.Module:
    """Train (or go on training), run the self-check and, by default, evaluate; returns the
    trained model.

    Args:
        config: the run's configuration (device defaults filled here).
        run_dir: the run folder; with ``resume``, an existing one.
        resume: go on from ``run_dir/checkpoints/last.pt``.
        world: the process group (``distributed.setup()`` when None).
        evaluate_after: evaluate each class's test set at the end (the self-check's figures
            go into its tables).
    """
    world = world or distributed.setup(config.device)
    fitted = fit(config, run_dir, resume=resume, world=world, check_test=evaluate_after)
    if evaluate_after:
        finish(fitted, run_dir, world)
    for line in selfcheck.warning_lines(fitted.self_check):
        log(world, line)
    return fitted.model


def finish(fitted: Fitted, run_dir: str | os.PathLike, world: distributed.World) -> None:
    """Evaluate a fitted run in ``run_dir`` (its self-check in the tables) and store the
    decision threshold with its checkpoint."""
    config = fitted.config
    result = evaluate_all(fitted.model, fitted.data_root, config.class_list(),
                          config.image_size, run_dir, world, dataclasses.asdict(config),
                          self_check=fitted.self_check)
    if world.is_main:
        store_calibration(Path(run_dir) / "checkpoints" / "last.pt", result.calibration)


def store_calibration(ckpt_path: str | os.PathLike, calibrated: dict | None) -> None:
    """Add an evaluation's decision threshold and score range to a checkpoint (atomically)."""
    state = checkpoint.load(ckpt_path)
    state["calibration"] = calibrated
    checkpoint.save_atomic(state, ckpt_path)
