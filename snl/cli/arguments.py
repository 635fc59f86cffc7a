"""The ``snl`` command's arguments: one subcommand parser per job."""

from __future__ import annotations

import argparse
import math

from ..calibration import parse_method
from ..data import HOLDOUT_MIN, PROBE_KINDS, parse_kinds
from ..loss import COMPACT_NORMS, CRAM_TAUS, DEFAULT_COMPACT_NORM, DEFAULT_CRAM_TAU, LossWeights
from ..model import PRECISIONS
from ..selfcheck import FLAG_BELOW
from .training import CPU_DEFAULTS, FORMULATION_FIELDS, GPU_DEFAULTS, TrainConfig


class UsageError(Exception):
    """A bad command line found after parsing (exit status 2, like argparse's own)."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line ``snl: error: ...`` (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"snl: error: {message} (see: {self.prog} --help)\n")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The parser of ``snl train | eval | predict | export | compare | info``."""
    p = Parser(prog="snl", description=description)
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")
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
    _formulation_arguments(t)
    t.add_argument("--seed", type=int, default=0, help="training seed (initialisation, "
                                                        "shuffling)")
    t.add_argument("--data-seed", type=int,
                   help="seed of the embedded default set (default: --seed)")
    t.add_argument("--workers", type=_non_negative, metavar="N",
                   help="data loader processes (default: 0 on a CPU, min(8, CPUs) on a GPU)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _precision_argument(t, "auto")
    t.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="training batches in page-locked memory, copied to the GPU without "
                        "blocking (GPU only; default: on)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the training step with torch.compile (the first steps "
                        "compile; the fused loss stays one op; default: off)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="weights and batches in channels-last memory (NHWC): a faster step on "
                        "a CPU; not yet timed on a GPU (default: off)")
    t.add_argument("--out", default="runs", help="parent folder of run folders")
    t.add_argument("--name", help="run folder name (default: a timestamp)")
    t.add_argument("--resume", metavar="RUN_DIR", help="go on with an interrupted run")
    _self_check_arguments(t)
    t.add_argument("--restarts", type=_positive, default=1, metavar="N",
                   help="train up to N seeds (--seed, --seed + 1, ...), stopping at the first "
                        "the self-check flags no class of, and keep the one it prefers "
                        "(default 1: one run)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a data set")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="data set folder (default: the embedded texture set)")
    e.add_argument("--dataset", choices=("mvtec", "visa"), default="mvtec")
    e.add_argument("--classes", default="all")
    e.add_argument("--out", help="output folder (default: beside the checkpoint's run)")
    e.add_argument("--device")
    _precision_argument(e, None)
    e.add_argument("--threshold", default="f1", type=_threshold, metavar="f1|fpr=F",
                   help="decision threshold stored with the checkpoint for `snl predict`: the "
                        "F1-optimal one on this set (f1, the default) or the one that lets a "
                        "fraction F of its good images through as anomalous (fpr=0.05)")
    _probe_arguments(e)

    r = sub.add_parser("predict",
                       help="score image files; write scores, map overlays and report.html")
    r.add_argument("checkpoint")
    r.add_argument("images", nargs="+")
    r.add_argument("--out", default="predictions")
    r.add_argument("--device")
    _precision_argument(r, None)

    x = sub.add_parser("export", help="export the inference model to ONNX")
    x.add_argument("checkpoint")
    x.add_argument("--onnx", required=True, metavar="OUT")

    c = sub.add_parser("compare", help="train and evaluate SNL and RD on the same data, "
                                        "budget and seeds; write compare.md / compare.json")
    c.add_argument("--data", help="data set folder; default: the embedded texture set")
    c.add_argument("--data-seed", type=int, default=0,
                   help="seed of the embedded default set, the same for every run")
    c.add_argument("--classes", default="all")
    c.add_argument("--structures", default="snl,rd", help="comma-separated, among snl, rd")
    c.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    c.add_argument("--backbone")
    c.add_argument("--image-size", type=int)
    c.add_argument("--epochs", type=int)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--lr", type=float, default=0.005)
    c.add_argument("--num-centers", type=int, default=16)
    _formulation_arguments(c)
    c.add_argument("--reference", action="store_true", help="plain-PyTorch ops (fused=False)")
    c.add_argument("--no-pretrained", action="store_true", help="random teacher (tests only)")
    c.add_argument("--weights")
    c.add_argument("--workers", type=_non_negative, metavar="N",
                   help="data loader processes (default: 0 on a CPU, min(8, CPUs) on a GPU)")
    c.add_argument("--device")
    _precision_argument(c, "auto")
    c.add_argument("--out", default="runs", help="parent folder of the comparison folder")
    c.add_argument("--name", help="comparison folder name (default: compare-<timestamp>); "
                                  "rerunning with the same name skips finished runs")
    c.add_argument("--probes", default=",".join(PROBE_KINDS), metavar="KINDS",
                   help="cross-class probes, comma-separated ('' for none)")
    c.add_argument("--probe-count", type=int, default=8,
                   help="probe images per class and kind")
    _self_check_arguments(c)

    sub.add_parser("info", help="versions, device and kernel backends")
    for q in sub.choices.values():
        # --debug also after the subcommand; SUPPRESS keeps a flag given before it.
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error instead of one line")
    return p


def _formulation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SNL's loss (docs/model.md §1; structure snl only)")
    for name, what in (("ch", "the per-pixel cosines (channel distillation)"),
                       ("sp", "the per-channel cosines (spatial distillation)"),
                       ("intra", "the intra-affinity loss"), ("inter", "the inter-affinity loss"),
                       ("c", "CRAM's compactness"), ("rd", "RD4AD's flattened cosine")):
        default = getattr(LossWeights, f"w_{name}")
        g.add_argument(f"--w-{name}", type=_weight, default=default, metavar="W",
                       help=f"weight of {what}; 0 switches it off (default {default})")
    g.add_argument("--compact-norm", choices=COMPACT_NORMS, default=DEFAULT_COMPACT_NORM,
                   help="compactness as the op returns it (sum over the embedding's D "
                        "channels) or divided by D (default %(default)s)")
    g.add_argument("--residual-ratio", type=int, default=1, metavar="R",
                   help="CRAM's residual path phi through D / R channels (default 1: a D x D "
                        "1x1 convolution)")
    g.add_argument("--cram-tau", choices=CRAM_TAUS, default=DEFAULT_CRAM_TAU,
                   help="CRAM's initial temperature: the embedding width D or its square root "
                        "(default %(default)s)")


def _self_check_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("self-check (held-out training images against cut-paste probes)")
    g.add_argument("--self-check", action=argparse.BooleanOptionalAction, default=True,
                   help="hold out part of each class's normal training images (never trained "
                        "on), score them against cut-paste probes after training and warn "
                        f"about a class whose probe image AUROC is below {100 * FLAG_BELOW:.0f}"
                        " (default: on)")
    g.add_argument("--holdout", type=_positive, default=HOLDOUT_MIN, metavar="N",
                   help="least number of training images held out per class: max(N, 10%%), "
                        f"at most half of them (default {HOLDOUT_MIN})")


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``, refused with the value named."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value
    return parse


_non_negative = _int_at_least(0)
_positive = _int_at_least(1)


def _threshold(text: str) -> str:
    try:
        return parse_method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _weight(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"a loss weight must be a finite number >= 0, got {text}")
    return value


def formulation_arguments(args: argparse.Namespace) -> dict[str, float | str]:
    """The ``TrainConfig`` loss fields of parsed ``snl train`` / ``snl compare`` arguments."""
    return {name: getattr(args, name) for name in FORMULATION_FIELDS}


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probes", default="", metavar="KINDS",
                   help="cross-class probes scored as extra defect types, comma-separated: "
                        f"{', '.join(PROBE_KINDS)} (default: none)")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the probe images")
    p.add_argument("--probe-count", type=int, default=8,
                   help="probe images per class and kind")


def _precision_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--precision``: "auto" (training's default: bf16 on a GPU, fp32 on a CPU), "fp32" or
    "bf16"; None (eval, predict): the run's own."""
    if default is None:
        parser.add_argument("--precision", choices=PRECISIONS, default=None,
                            help="fp32, or bf16 (the networks under bf16 autocast; the ops "
                                 "accumulate in fp32); default: the precision the run was "
                                 "trained in")
    else:
        parser.add_argument("--precision", choices=("auto", *PRECISIONS), default=default,
                            help="fp32, or bf16 (the networks under bf16 autocast; the ops "
                                 "accumulate in fp32); auto: bf16 on a GPU, fp32 on a CPU "
                                 f"(default {default})")


def probe_kinds(args: argparse.Namespace) -> list[str]:
    """The ``--probes`` kinds; exits with a message naming the bad one."""
    try:
        return parse_kinds(args.probes)
    except ValueError as exc:
        raise UsageError(f"--probes {args.probes!r}: {exc}") from None


def compare_config(args: argparse.Namespace) -> TrainConfig:
    """What the runs of ``snl compare`` share (structure and seed are set per run)."""
    return TrainConfig(
        data=args.data, classes=args.classes, backbone=args.backbone,
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, fused=not args.reference, pretrained=not args.no_pretrained,
        weights=args.weights, num_centers=args.num_centers, data_seed=args.data_seed,
        workers=args.workers, device=args.device, self_check=args.self_check,
        holdout=args.holdout, precision=args.precision, **formulation_arguments(args))


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``snl train`` arguments."""
    return TrainConfig(
        data=args.data, classes=args.classes, backbone=args.backbone,
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, structure=args.structure, fused=not args.reference,
        pretrained=not args.no_pretrained, weights=args.weights,
        num_centers=args.num_centers, seed=args.seed, data_seed=args.data_seed,
        workers=args.workers, device=args.device, self_check=args.self_check,
        holdout=args.holdout, precision=args.precision, pin_memory=args.pin_memory,
        compile=args.compile, channels_last=args.channels_last, **formulation_arguments(args))
