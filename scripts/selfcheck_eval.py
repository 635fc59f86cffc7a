"""How well the self-check finds broken class-runs, over the runs of `snl compare` folders.

    python scripts/selfcheck_eval.py default=runs/compare-a v1=runs/compare-b

Per setting (a name and a comparison folder; every finished run under its ``runs/``): a
class-run is *broken* when its image AUROC on the real defects is more than 10 points under
the median of its class and structure in that setting; it is *flagged* when its self-check
figure is under ``snl.selfcheck.FLAG_BELOW``. Prints the Spearman rank correlation of the
figure with the image AUROC over the class-runs, the flagged broken and flagged good
class-runs, the same for the ``test/good`` cut-paste probe of the runs (``--probes``
cutpaste, scored like a defect type), and every broken or flagged class-run.
"""

from __future__ import annotations

import glob
import json
import sys

import numpy as np
from scipy.stats import spearmanr

from snl.selfcheck import FLAG_BELOW, broken


def class_runs(folder: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(f"{folder}/runs/*/result.json")):
        with open(path) as f:
            run = json.load(f)
        for name, check in run["self_check"]["classes"].items():
            rows.append({"structure": run["structure"], "seed": run["seed"], "class": name,
                         "figure": check["image_auroc"], "auroc": run["table"][name]["image_auroc"],
                         "probe": run["by_type"][name]["cutpaste"]["image_auroc"]})
    return rows


def report(setting: str, rows: list[dict]) -> None:
    auroc = np.array([r["auroc"] for r in rows])
    is_broken = broken(auroc, [(r["structure"], r["class"]) for r in rows])
    runs = len({(r["structure"], r["seed"]) for r in rows})
    print(f"{setting}: {len(rows)} class-runs of {runs} runs, {int(is_broken.sum())} broken")
    for key, what in (("figure", "self-check"), ("probe", "test/good cut-paste probe")):
        values = np.array([r[key] for r in rows])
        flagged = values < FLAG_BELOW
        print(f"  {what}: Spearman {spearmanr(values, auroc).statistic:.3f}; under "
              f"{100 * FLAG_BELOW:.1f}: {int((flagged & is_broken).sum())} of "
              f"{int(is_broken.sum())} broken, {int((flagged & ~is_broken).sum())} of "
              f"{int((~is_broken).sum())} good")
    for r, b in zip(rows, is_broken, strict=True):
        if b or r["figure"] < FLAG_BELOW:
            print(f"  {r['structure']} seed {r['seed']} {r['class']}: self-check "
                  f"{100 * r['figure']:.1f}, image AUROC {100 * r['auroc']:.1f}, cut-paste probe "
                  f"{100 * r['probe']:.1f}{', broken' if b else ''}"
                  f"{', flagged' if r['figure'] < FLAG_BELOW else ''}")


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    for setting, folder in (a.split("=", 1) for a in argv):
        rows = class_runs(folder)
        if not rows:
            print(f"{setting}: no finished run with a self-check under {folder}/runs",
                  file=sys.stderr)
            return 1
        report(setting, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
