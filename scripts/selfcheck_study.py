"""What the self-check's cut-paste figure follows: the base images' novelty, and the epochs.

    python scripts/selfcheck_study.py bases DIR [DIR ...]
    python scripts/selfcheck_study.py epochs OUT --seeds 0,1,2 [--data DIR] [--set w_ch=1 ...]

``bases`` re-scores the last checkpoint of every run under each ``DIR/runs`` (``snl compare``
folders) with the self-check's cut-paste probes built five ways: the base (normal) images
are the held-out training images (``H``, as ``snl train`` does) or the first 8 ``test/good``
images (``T``), and the pasted rectangle comes from another class's ``H`` or ``T`` images;
``RR`` turns the held-out images by 180 degrees, bases and patches.
It prints the figure of every class-run and, per base and lender, the Spearman rank
correlation with the run's real image AUROC and the class-runs under
``snl.selfcheck.FLAG_BELOW`` among the broken and the good ones (broken: more than 10 points
under the median of its class and structure in its folder, as
``scripts/selfcheck_eval.py`` says).

``epochs`` trains one run per seed (``snl train``'s configuration; ``--set`` changes its
fields, e.g. the first formulation: ``--set w_ch=1 w_sp=1 w_intra=1 w_inter=1 w_rd=0
compact_norm=sum``), keeps the model every 2 epochs and scores each kept model: the ``H``
and ``T`` figures (lender of the same kind) and the real image AUROC, per class. It prints
the trajectories, the Spearman correlation over seeds x epochs, and the real image AUROC a
run would end with if it kept, of its last three kept epochs, the one with the best figure.
``OUT/epochs.json`` holds every number.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from snl import metrics, selfcheck
from snl.data import TestDataset, split_holdout
from snl.data.holdout import PROBES_PER_IMAGE, to_model_input
from snl.data.probes import _cutpaste, _read

KINDS = ("HH", "HT", "TH", "TT", "RR")  # base kind, lender kind
TEST_BASES = 8


def pools(data: Path, size: int) -> dict[str, dict[str, list[np.ndarray]]]:
    """``{"H" | "T" | "R": {class: images}}``: held-out training images, ``test/good``
    ones, and the held-out images turned by 180 degrees (familiar pixels, new layout)."""
    held = split_holdout(data, "all")
    images = {"H": {c: [_read(p, size) for p in paths] for c, paths in held.held.items()},
              "T": {c: [_read(p, size) for p in sorted((data / c / "test" / "good").glob("*.png"))
                        [:TEST_BASES]] for c in held.held}}
    images["R"] = {c: [np.ascontiguousarray(a[::-1, ::-1]) for a in v]
                   for c, v in images["H"].items()}
    return images


def probe_images(images: dict, kind: str, name: str, seed: int = 0) -> tuple[np.ndarray, int]:
    """The ``kind`` base images of class ``name`` followed by their cut-paste probes, and
    how many bases; the lender is another class's image of ``kind[1]``, drawn as
    :func:`snl.data.make_holdout_probes` draws it."""
    bases, lenders = images[kind[0]][name], images[kind[1]]
    others = [c for c in lenders if c != name]
    probes = []
    for i in range(PROBES_PER_IMAGE * len(bases)):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1, i])
        other = lenders[others[int(rng.integers(len(others)))]]
        image, _, _ = _cutpaste(bases[i % len(bases)], other[int(rng.integers(len(other)))],
                                rng)
        probes.append(image)
    return np.concatenate([np.stack(bases), np.stack(probes)]), len(bases)


@torch.no_grad()
def figure(model, images: np.ndarray, n: int) -> float:
    """Probe image AUROC of ``images[:n]`` (normal) against ``images[n:]``."""
    norm = model.normalization
    scores, _ = model.predict(to_model_input(images, norm.mean, norm.std))
    scores = scores.float().numpy()
    return selfcheck.probe_auroc(scores[:n], scores[n:])


def _broken(rows: list[dict]) -> np.ndarray:
    return selfcheck.broken([r["real"] for r in rows],
                            [(r["folder"], r["structure"], r["class"]) for r in rows])


def bases(folders: list[str]) -> int:
    from snl.cli.prediction import load_run
    from snl.cli.training import training_data_root

    rows, cache = [], {}
    for folder in folders:
        for ckpt in sorted(glob.glob(f"{folder}/runs/*/checkpoints/last.pt")):
            run = json.loads((Path(ckpt).parents[1] / "result.json").read_text())
            model, config, _ = load_run(ckpt, "cpu")
            data = training_data_root(config)
            key = (str(data), config.image_size)
            if key not in cache:
                cache[key] = pools(data, config.image_size)
            for name in cache[key]["H"]:
                row = {"run": f"{folder}:{run['structure']}-seed{run['seed']}", "class": name,
                       "folder": folder,
                       "structure": run["structure"], "real": run["table"][name]["image_auroc"]}
                row.update({k: figure(model, *probe_images(cache[key], k, name)) for k in KINDS})
                rows.append(row)
                print(f"{row['run']} {name}: real {100 * row['real']:.1f}, " + ", ".join(
                    f"{k} {100 * row[k]:.1f}" for k in KINDS), flush=True)
    if not rows:
        print("no run with a checkpoint under " + ", ".join(folders), file=sys.stderr)
        return 1
    broken, real = _broken(rows), np.array([r["real"] for r in rows])
    print(f"{len(rows)} class-runs, {int(broken.sum())} broken")
    for k in KINDS:
        values = np.array([r[k] for r in rows])
        flagged = values < selfcheck.FLAG_BELOW
        print(f"  base {k[0]}, lender {k[1]}: Spearman {spearmanr(values, real).statistic:.2f}; "
              f"flagged {int((flagged & broken).sum())} of {int(broken.sum())} broken, "
              f"{int((flagged & ~broken).sum())} of {int((~broken).sum())} good")
    return 0


def _parse_set(items: list[str]) -> dict:
    from snl.cli.training import TrainConfig

    fields, out = TrainConfig.__dataclass_fields__, {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise SystemExit(f"--set: {item!r} is not FIELD=VALUE of TrainConfig")
        try:
            out[key] = json.loads(value)  # numbers and booleans
        except ValueError:
            out[key] = value
    return out


def epochs(out: Path, seeds: list[int], data: str | None, overrides: dict) -> int:
    from snl.cli import training

    root = Path(data) if data else training.default_data_root(0)
    if not data:
        training.make_default_dataset(root)
    result: dict = {}
    images, tests = None, {}
    for seed in seeds:
        kept = {}
        save = training.checkpoint.save_atomic

        def keep(obj, path, _save=save, _kept=kept):
            if obj.get("epoch", 1) % 2 == 0:
                _kept[obj["epoch"]] = copy.deepcopy(obj["model"])
            return _save(obj, path)

        training.checkpoint.save_atomic = keep
        try:
            config = training.TrainConfig(seed=seed, data=str(root), data_seed=0, **overrides)
            fitted = training.fit(config, out / f"seed{seed}")
        finally:
            training.checkpoint.save_atomic = save
        model, size, norm = fitted.model, fitted.config.image_size, fitted.model.normalization
        images = images or pools(root, size)
        trajectory = {}
        for epoch, state in sorted(kept.items()):
            model.load_state_dict(state)
            model.eval()
            row = {}
            for name in images["H"]:
                if name not in tests:
                    ds = TestDataset(root, name, size=size, mean=norm.mean, std=norm.std)
                    tests[name] = (torch.stack([ds[i]["image"] for i in range(len(ds))]),
                                   ds.labels())
                x, labels = tests[name]
                with torch.no_grad():
                    scores = model.predict(x)[0].float().numpy().astype(np.float64)
                row[name] = {"real": metrics.auroc(scores, labels),
                             **{k[0]: figure(model, *probe_images(images, k, name))
                                for k in ("HH", "TT")}}
            trajectory[epoch] = row
        result[seed] = trajectory
        (out / "epochs.json").write_text(json.dumps(result, indent=1))
        print(f"seed {seed} (real/H/T by epoch)")
        for name in images["H"]:
            print(f"  {name:8s}" + " ".join(
                f"e{e}:{100 * t[name]['real']:.0f}/{100 * t[name]['H']:.0f}/"
                f"{100 * t[name]['T']:.0f}" for e, t in trajectory.items()), flush=True)
    _epoch_summary(result)
    return 0


def _epoch_summary(result: dict) -> None:
    seeds = list(result)
    for name in next(iter(result[seeds[0]].values())):
        cells = [t[name] for s in seeds for t in result[s].values()]
        real = [c["real"] for c in cells]
        last = {s: sorted(result[s])[-3:] for s in seeds}
        final = [result[s][last[s][-1]][name]["real"] for s in seeds]
        print(f"{name}: Spearman over seeds x epochs, real with H "
              f"{spearmanr(real, [c['H'] for c in cells]).statistic:.2f}, with T "
              f"{spearmanr(real, [c['T'] for c in cells]).statistic:.2f}; real at the last "
              f"epoch: {' '.join(f'{100 * v:.0f}' for v in final)}")
        for key in ("H", "T"):
            picked = [result[s][max(last[s], key=lambda e, s=s: (result[s][e][name][key], e))]
                      [name]["real"] for s in seeds]
            print(f"  keeping the epoch of the best {key} figure of the last three: "
                  f"{' '.join(f'{100 * v:.0f}' for v in picked)} (lowest {100 * min(picked):.0f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bases")
    b.add_argument("folders", nargs="+")
    e = sub.add_parser("epochs")
    e.add_argument("out", type=Path)
    e.add_argument("--seeds", required=True)
    e.add_argument("--data")
    e.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.what == "bases":
        return bases(args.folders)
    return epochs(args.out, [int(s) for s in args.seeds.split(",")], args.data,
                  _parse_set(args.set))


if __name__ == "__main__":
    sys.exit(main())
