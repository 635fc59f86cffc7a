"""The ``snl`` command: train, evaluate, predict, export, compare and info.

``snl train`` with no data argument makes the embedded default data set (texture photographs
shipped inside scikit-image with synthetic defects, :mod:`snl.data.textures`) and trains on
the union of its classes, then evaluates each class. Defaults depend on the device: on a
CPU a small offline-pretrained teacher (EfficientNet-Lite0), 128x128 images and few epochs,
so that the whole job finishes in minutes on two cores; on a GPU the paper's setting
(WideResNet-50-2, 256x256, Adam lr 0.005, betas (0.5, 0.999), batch 16).

A run folder holds ``config.json``, ``checkpoints/last.pt`` (written atomically after every
epoch, read with ``weights_only=True``), ``history.json``, with the self-check on (the
default) ``self_check.json``, and after evaluation ``metrics.json``, ``calibration.json``
(also stored in the checkpoint, for ``snl predict``), ``report.md``, ``report.html``
(self-contained: tables, curves, image grids; :mod:`snl.html_report`), ``curves.json``,
``roc.png`` and ``overlays/*.png``; with ``--restarts N`` also ``restarts.json`` and the
other seeds' runs in ``restarts/`` (:mod:`.restarts`). ``--resume RUN`` goes on from the
last checkpoint and gives the same parameters as an uninterrupted run: the shuffling order
of epoch e depends only on (seed, e), and nothing else is random.

Under ``torchrun --nproc_per_node=N -m snl train ...`` every process trains on its shard
with ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPUs), evaluation is sharded and
gathered, and only rank 0 writes files.

The modules, one per job: :mod:`.arguments` (argument parsing), :mod:`.training`,
:mod:`.evaluation` (metrics, reports, overlays), :mod:`.restarts` (``--restarts``),
:mod:`.prediction` (prediction and ONNX export); :mod:`.console` prints for all of them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from snl_kernels import BackendUnavailableError

from .. import distributed, selfcheck
from ..data import DatasetError, check_dataset, split_holdout
from ..weights import WeightsUnavailableError
from .arguments import UsageError, build_parser, compare_config, probe_kinds, train_config
from .evaluation import evaluate, evaluate_all
from .prediction import export_onnx, load_run, predict_files
from .restarts import train_with_restarts
from .training import (
    TrainConfig,
    build_model,
    resolve_data,
    store_calibration,
    train,
    training_data_root,
)

__all__ = [
    "TrainConfig",
    "build_model",
    "evaluate",
    "evaluate_all",
    "export_onnx",
    "load_run",
    "main",
    "predict_files",
    "resolve_data",
    "store_calibration",
    "train",
    "train_with_restarts",
]


class CommandError(Exception):
    """An expected failure of a command (exit status 1), said in one line."""


#: Errors a user can fix (a path, a file, an option, a missing package): one line, exit 1,
#: unless --debug. Anything else is a bug and keeps its traceback.
EXPECTED = (CommandError, DatasetError, WeightsUnavailableError, BackendUnavailableError,
            FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            ValueError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``snl`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status.

    Bad usage prints ``snl: error: ...`` and returns 2; an expected failure (a missing
    folder or checkpoint, an unreadable image, a missing extra) prints ``snl: error: ...``
    and returns 1; ``--debug`` shows the full traceback instead.
    """
    args = build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"snl: error: {exc} (see: snl {args.command} --help)", file=sys.stderr)
        return 2
    except EXPECTED as exc:
        if args.debug:
            raise
        print(f"snl: error: {_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("snl: interrupted", file=sys.stderr)
        return 130


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _run(args) -> int:
    if args.command == "info":
        from snl_kernels.__main__ import report as kernels_report

        print(kernels_report())
        return 0
    if args.command == "train":
        config = train_config(args)
        if args.restarts > 1 and args.resume:
            raise UsageError(f"--restarts {args.restarts} cannot go with --resume: a restarts "
                             "run keeps one seed's run, resume that one without --restarts")
        if args.restarts > 1 and not args.self_check:
            raise UsageError(f"--restarts {args.restarts} chooses among seeds by the "
                             "self-check: drop --no-self-check")
        world = distributed.setup(args.device)
        try:
            if args.resume:
                train(config, args.resume, resume=True, world=world)
            else:
                name = args.name or time.strftime("%Y%m%d-%H%M%S")
                run_dir = Path(args.out) / name
                if world.is_main and ((run_dir / "checkpoints" / "last.pt").exists()
                                      or (run_dir / "restarts").exists()):
                    raise CommandError(f"{run_dir} already holds a run; use --resume "
                                       f"{run_dir} or another --name")
                if args.restarts > 1:
                    train_with_restarts(config, run_dir, args.restarts, world=world)
                else:
                    train(config, run_dir, world=world)
        finally:
            distributed.teardown(world)
        return 0
    if args.command == "eval":
        probes = probe_kinds(args)
        model, config, world = load_run(args.checkpoint, args.device, args.precision)
        data = Path(args.data) if args.data else resolve_data(
            dataclasses.replace(config, data=None), world)
        classes = "all" if args.classes == "all" else args.classes.split(",")
        check_dataset(data, classes, train=False, test=True)
        out = Path(args.out) if args.out else Path(args.checkpoint).parent.parent / "eval"
        check = None
        if config.self_check and data.resolve() == training_data_root(config).resolve():
            # The data it was trained on: the same held-out images, the same self-check.
            holdout = split_holdout(data, config.class_list(), config.holdout)
            check = selfcheck.run(model, holdout, config.image_size, world.device, root=data)
        result = evaluate_all(model, data, classes,
                              config.image_size, out, world, dataclasses.asdict(config),
                              probes=probes, probe_seed=args.probe_seed,
                              probe_count=args.probe_count, threshold=args.threshold,
                              self_check=check)
        if world.is_main:
            store_calibration(args.checkpoint, result.calibration)
            c = result.calibration
            print(f"threshold ({c['method']}) {c['threshold']:.6g} stored in {args.checkpoint}")
            for line in selfcheck.warning_lines(check):
                print(line, flush=True)
        table = result.table
        return 0 if all(not math.isnan(v) for row in table.values() for v in row.values()) else 1
    if args.command == "compare":
        from ..compare import compare, parse_ints

        try:
            seeds = parse_ints(args.seeds, "--seeds")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        structures = [s for s in args.structures.split(",") if s]
        if not structures or any(s not in ("snl", "rd") for s in structures):
            raise UsageError(f"--structures must name snl and/or rd, got {args.structures!r}")
        name = args.name or time.strftime("compare-%Y%m%d-%H%M%S")
        compare(Path(args.out) / name, compare_config(args), seeds=seeds,
                structures=structures,
                probes=probe_kinds(args), probe_count=args.probe_count)
        return 0
    if args.command == "predict":
        results = predict_files(args.checkpoint, args.images, args.out, args.device,
                                args.precision)
        if results and "label" not in results[0]:
            print("snl: no decision threshold in this checkpoint (run `snl eval` on it to "
                  "store one): raw scores only", file=sys.stderr)
            for result in results:
                print(f"{result['score']:.6f}  {result['path']}")
            return 0
        print("score       normalised  label      path")
        for result in results:
            print(f"{result['score']:<10.6f}  {result['normalised']:<10.4f}  "
                  f"{result['label']:<9}  {result['path']}")
        return 0
    if args.command == "export":
        print(export_onnx(args.checkpoint, args.onnx))
        return 0
    raise AssertionError(args.command)
