"""The ablation of SNL's loss formulation (docs/model.md §1, "Choosing the formulation").

Each row is one ``snl compare`` (same data set, budget, probes and training seeds as every
other row) with the row's loss options; the script runs the rows it is given (a rerun skips
finished runs, as ``snl compare`` does) and writes ``ablation.md``: mean ± sample std over
the seeds of image AUROC, AUPRO@0.3, pixel AUROC and the image AUROC of the cross-class
types (foreign, cutpaste, mixup), mean over classes.

    python scripts/ablation.py --out runs/ablation --seeds 0,1 [--rows "NAME;NAME..."]
        [--threads 1]

The figures in docs/model.md §1 came from single-threaded processes, two at a time, on a 2-core
CPU; another thread count changes the order of float sums and so the runs' figures within
their spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

#: row name -> (structure, loss options beside the defaults of TrainConfig); the options
#: are the ``snl train`` / ``snl compare`` flags (--w-ch, ..., --compact-norm, --residual-ratio).
STRUCTURAL = ("w_ch", "w_sp", "w_intra", "w_inter")


def _weights(value: float, **rest) -> dict:
    """Every structural weight ``value``; compactness divided by D, the full residual path and
    CRAM's temperature starting at D unless ``rest`` says otherwise."""
    return {**{k: value for k in STRUCTURAL}, "compact_norm": "dim", "residual_ratio": 1,
            "cram_tau": "dim", **rest}


ROWS: dict[str, tuple[str, dict]] = {
    "RD4AD baseline (structure rd)": ("rd", {}),
    "v1: structural terms 1, compactness 0.1 (sum over D)": (
        "snl", _weights(1.0, w_c=0.1, w_rd=0.0, compact_norm="sum")),
    "v1, compactness / D": ("snl", _weights(1.0, w_c=0.1, w_rd=0.0)),
    "v1, compactness / D, + RD loss": ("snl", _weights(1.0, w_c=0.1, w_rd=1.0)),
    "RD loss + CRAM, compactness 0": ("snl", _weights(0.0, w_c=0.0, w_rd=1.0)),
    "RD loss + CRAM, compactness 0.1": ("snl", _weights(0.0, w_c=0.1, w_rd=1.0)),
    "RD loss + CRAM, compactness 1": ("snl", _weights(0.0, w_c=1.0, w_rd=1.0)),
    "RD loss + CRAM, compactness 3": ("snl", _weights(0.0, w_c=3.0, w_rd=1.0)),
    "RD loss + affinities 1 + CRAM": ("snl", {**_weights(0.0, w_intra=1.0, w_inter=1.0),
                                              "w_c": 0.1, "w_rd": 1.0}),
    "structural terms 0.1, compactness 0": ("snl", _weights(0.1, w_c=0.0, w_rd=1.0)),
    "structural terms 0.1, compactness 0.01": ("snl", _weights(0.1, w_c=0.01, w_rd=1.0)),
    "structural terms 0.1, compactness 0.1": ("snl", _weights(0.1, w_c=0.1, w_rd=1.0)),
    "structural terms 0.1, compactness 1": ("snl", _weights(0.1, w_c=1.0, w_rd=1.0)),
    "structural terms 0.1, compactness 3": ("snl", _weights(0.1, w_c=3.0, w_rd=1.0)),
    "structural terms 0.01, compactness 0": ("snl", _weights(0.01, w_c=0.0, w_rd=1.0)),
    "default: structural terms 0.01, compactness 0.1": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0)),
    "structural terms 0.03, compactness 0.1": ("snl", _weights(0.03, w_c=0.1, w_rd=1.0)),
    "structural terms 0.01, compactness 0.03": ("snl", _weights(0.01, w_c=0.03, w_rd=1.0)),
    "structural terms 0.01, compactness 0.3": ("snl", _weights(0.01, w_c=0.3, w_rd=1.0)),
    "structural terms 0.003, compactness 0.1": ("snl", _weights(0.003, w_c=0.1, w_rd=1.0)),
    "RD4AD baseline, 24 epochs": ("rd", {"epochs": 24}),
    "default, 24 epochs": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0, epochs=24)),
    "default, per-pixel cosine 1": ("snl", _weights(0.01, w_ch=1.0, w_c=0.1, w_rd=1.0)),
    "default, per-channel cosine 1": ("snl", _weights(0.01, w_sp=1.0, w_c=0.1, w_rd=1.0)),
    "default, intra-affinity 1": ("snl", _weights(0.01, w_intra=1.0, w_c=0.1, w_rd=1.0)),
    "default, inter-affinity 1": ("snl", _weights(0.01, w_inter=1.0, w_c=0.1, w_rd=1.0)),
    "default, 64 centres": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0, num_centers=64)),
    "default, residual ratio 2": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0, residual_ratio=2)),
    "default, residual ratio 4": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0, residual_ratio=4)),
    "default, residual ratio 4, 64 centres": (
        "snl", _weights(0.01, w_c=0.1, w_rd=1.0, residual_ratio=4, num_centers=64)),
    "structural terms 0.1, residual ratio 4": (
        "snl", _weights(0.1, w_c=0.1, w_rd=1.0, residual_ratio=4)),
    "default, residual ratio 8": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0, residual_ratio=8)),
    "default, residual ratio 8, compactness 1": (
        "snl", _weights(0.01, w_c=1.0, w_rd=1.0, residual_ratio=8)),
    "default, residual ratio 32": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0, residual_ratio=32)),
    "default, CRAM temperature sqrt(D)": ("snl", _weights(0.01, w_c=0.1, w_rd=1.0,
                                                          cram_tau="sqrt")),
    "default, CRAM temperature sqrt(D), compactness 1": (
        "snl", _weights(0.01, w_c=1.0, w_rd=1.0, cram_tau="sqrt")),
}
METRICS = (("image AUROC", "image_auroc"), ("AUPRO@0.3", "aupro"),
           ("pixel AUROC", "pixel_auroc"))
TYPES = ("foreign", "cutpaste", "mixup")


def folder_name(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row).strip("-").replace("--", "-")


def _stat(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(out: Path, rows: list[str]) -> str:
    """The Markdown table of the finished runs of ``rows`` under ``out``."""
    lines = ["| formulation | seeds | " + " | ".join(m for m, _ in METRICS) + " | "
             + " | ".join(TYPES) + " |", "|---|---|" + "---|" * (len(METRICS) + len(TYPES))]
    for row in rows:
        results = [json.loads(p.read_text()) for p in
                   sorted((out / folder_name(row) / "runs").glob("*/result.json"))]
        if not results:
            continue
        seeds = ",".join(str(r["seed"]) for r in sorted(results, key=lambda r: r["seed"]))
        cells = [_stat([100 * r["table"]["mean"][key] for r in results]) for _, key in METRICS]
        for kind in TYPES:
            per_seed = [100 * statistics.mean(by_class[kind]["image_auroc"]
                                              for by_class in r["by_type"].values()
                                              if kind in by_class)
                        for r in results]
            cells.append(_stat(per_seed))
        lines.append(f"| {row} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rows", help="row names separated by ';' (default: every row)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--table-only", action="store_true", help="write the table, run nothing")
    args = p.parse_args()
    rows = list(ROWS) if not args.rows else [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"ablation: unknown rows {unknown}; known: {list(ROWS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.table_only:
        from snl.cli import TrainConfig
        from snl.compare import compare, parse_ints

        seeds = parse_ints(args.seeds, "--seeds")
        for row in rows:
            structure, options = ROWS[row]
            # docs/ablation.md's runs trained on every training image: the self-check's
            # hold-out (snl train's default since) is off here, so the table reproduces.
            config = dataclasses.replace(TrainConfig(data_seed=0, self_check=False), **options)
            compare(out / folder_name(row), config, seeds=seeds, structures=[structure])
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table(out, rows))
    print(out / "ablation.md")


if __name__ == "__main__":
    main()
