"""``snl compare``: SNL against its reverse-distillation baseline, same data, budget and seeds.

Every structure (``snl``, ``rd``) is trained once per training seed (seed by seed, the
structures in turn) on the same data, with the same backbone, image size, epochs, batch size
and learning rate, and evaluated on the
data set's test images plus the cross-class probes (:mod:`snl.data.probes`). The data set
is fixed across runs: the embedded default set is made with ``data_seed`` whatever the
training seed, and the probes are made once, with ``data_seed`` too.

The comparison folder holds::

    settings.json               what every run shares (a rerun must match it)
    probes/                     the probe images, shared by every run
    runs/<structure>-seed<N>/   a training run folder (checkpoints, history, report,
                                metrics.json, metrics_by_type.json, self_check.json) and
                                result.json
    compare.json                per-seed numbers of every finished run, and their summary
    compare.md                  the tables: mean ± std over seeds, per metric, per class
                                and per defect type (probes included), and the self-check
                                beside the image AUROC on the real defects
    report.html                 the same tables, each class's ROC and PRO curves of every
                                structure (first seed), and links to every run's
                                report.html (its image grids), self-contained

A run's ``result.json`` is written when its evaluation ends, and ``compare.json`` and
``compare.md`` are rewritten after every run, so a crash loses at most the run in flight;
a rerun into the same folder skips finished runs and resumes an interrupted training from
its last checkpoint. The spread is the sample standard deviation over seeds (ddof = 1; 0
with one seed); ``compare.json`` also gives min and max.

With the self-check on (the default, :mod:`snl.selfcheck`), every run holds out the same
training images; its figure per class is a column of the tables (``self-check``), each
run's ``result.json`` keeps its figures and flags, and a section sets it beside the image
AUROC on the real defects: per class, both figures' mean ± std and the flagged runs, and
the Spearman rank correlation of the two over every (run, class).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from . import distributed, html_report, report, selfcheck
from .cli import CommandError
from .cli.console import log
from .cli.evaluation import evaluate_all
from .cli.training import (
    BEFORE_PRECISION,
    BEFORE_SELF_CHECK,
    V1_FORMULATION,
    TrainConfig,
    resolve_data,
    train,
)
from .data import PROBE_KINDS, TestDataset, check_dataset, make_probes, parse_kinds

SPREAD = "sample standard deviation over training seeds (ddof=1; 0 with one seed)"
ALL = "all"  #: the type of the per-class row: good against every real defect image
STRUCTURES = ("snl", "rd")
SELF_CHECK = "self_check"  #: the self-check's key in a run's per-class rows
#: The tables of one metric per class and defect type: every metric but the self-check,
#: which has no per-type value (its own section sets it beside the image AUROC).
TYPE_METRICS = tuple((k, label) for k, label in report.METRIC_COLUMNS if k != SELF_CHECK)


def parse_ints(text: str, what: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ValueError naming ``what`` and the bad value."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{what} must name distinct integers, got {text!r}")
    return values


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _rows(result: dict) -> dict[str, dict[str, dict[str, float]]]:
    """``{class: {type: {metric: value}}}`` of one run; type ``"all"`` is the class row."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for name, row in result["table"].items():
        rows.setdefault(name, {})[ALL] = row
    for name, types in result["by_type"].items():
        rows.setdefault(name, {}).update(types)
    return rows


def summarize(runs: dict[str, dict[str, dict]]) -> dict:
    """``{structure: {class: {type: {metric: stats}}}}`` over the seeds of each structure.

    ``runs[structure][seed]`` is a run's result (``table`` and ``by_type``); ``stats`` are
    ``mean``, ``std`` (see ``SPREAD``), ``min``, ``max`` and ``n`` (seeds).
    """
    summary: dict = {}
    for structure, by_seed in runs.items():
        values: dict[str, dict[str, dict[str, list[float]]]] = {}
        for result in by_seed.values():
            for name, types in _rows(result).items():
                for kind, row in types.items():
                    for metric, value in row.items():
                        values.setdefault(name, {}).setdefault(kind, {}).setdefault(
                            metric, []).append(value)
        summary[structure] = {
            name: {kind: {metric: _stats(v) for metric, v in row.items()}
                   for kind, row in types.items()}
            for name, types in values.items()}
    return summary


def _cell(stats: dict | None) -> str:
    if stats is None or math.isnan(stats["mean"]):
        return "–"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _order(summary: dict) -> tuple[list[str], list[str]]:
    """Classes (``mean`` last) and types (``all`` first, probes last) in table order."""
    classes, kinds = [], []
    for per_class in summary.values():
        for name, types in per_class.items():
            if name not in classes:
                classes.append(name)
            kinds += [k for k in types if k not in kinds]
    classes = [c for c in classes if c != "mean"] + (["mean"] if "mean" in classes else [])
    probes = [k for k in PROBE_KINDS if k in kinds]
    kinds = [ALL] + [k for k in kinds if k != ALL and k not in probes] + probes
    return classes, kinds


def _metric_rows(summary: dict, classes: list[str], kinds: list[str], key: str):
    """(class, type, cells) of one metric's table: mean ± std per structure, and with two
    structures the difference of their means; rows no structure has are left out."""
    structures = list(summary)
    for name in classes:
        for kind in kinds:
            stats = [summary[s].get(name, {}).get(kind, {}).get(key) for s in structures]
            if all(s is None for s in stats):
                continue
            cells = [_cell(s) for s in stats]
            if len(structures) == 2:
                a, b = stats
                cells.append("–" if a is None or b is None
                             else f"{100 * (a['mean'] - b['mean']):+.1f}")
            yield name, kind, cells


def markdown(summary: dict, settings: dict, done: int, total: int,
             seconds: dict[str, list[float]], runs: dict | None = None) -> str:
    """The text of ``compare.md``; ``runs`` (``compare.json``'s) adds the self-check's
    section."""
    structures = list(summary)
    classes, kinds = _order(summary)
    lines = [f"# {' vs '.join(s.upper() for s in structures)}", "",
             f"Backbone {settings['backbone']}, {settings['image_size']} px, "
             f"{settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['lr']}; "
             f"data: {settings['data'] or 'embedded default set'} (data seed "
             f"{settings['data_seed']}); probes: {', '.join(settings['probes']) or 'none'}.", "",
             f"Metrics in percent, mean ± std over training seeds {settings['seeds']} (std: "
             f"{SPREAD}); per-seed numbers in `compare.json`. Runs finished: {done}/{total}.",
             "", "## Mean over classes (type all: good vs every real defect type)", "",
             "| structure | " + " | ".join(label for _, label in report.METRIC_COLUMNS)
             + " | train s/run |", "|---|" + "---|" * (len(report.METRIC_COLUMNS) + 1)]
    for structure in structures:
        row = summary[structure].get("mean", {}).get(ALL, {})
        secs = seconds.get(structure) or []
        lines.append(f"| {structure} | "
                     + " | ".join(_cell(row.get(k)) for k, _ in report.METRIC_COLUMNS)
                     + (f" | {np.median(secs):.0f} |" if secs else " | – |"))
    ratio = time_ratio(seconds)
    lines += ["", f"train s/run: the median over seeds of each run's training seconds; "
                  f"SNL over RD: {ratio:.2f}." if ratio else
              "train s/run: the median over seeds of each run's training seconds."]
    lines += self_check_markdown(runs or {}, classes)
    diff = len(structures) == 2
    for key, label in TYPE_METRICS:
        lines += ["", f"## {label} per class and defect type", "",
                  "| class | type | " + " | ".join(structures)
                  + (f" | {structures[0]} − {structures[1]} |" if diff else " |"),
                  "|---|---|" + "---|" * (len(structures) + diff)]
        for name, kind, cells in _metric_rows(summary, classes, kinds, key):
            label_name = f"**{name}**" if name == "mean" else name
            lines.append(f"| {label_name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def time_ratio(seconds: dict[str, list[float]]) -> float | None:
    """SNL's median training seconds per run over RD's, when both have runs."""
    if not (seconds.get("snl") and seconds.get("rd")):
        return None
    return float(np.median(seconds["snl"]) / np.median(seconds["rd"]))


def _kept_self_check(check: dict) -> dict:
    """What ``result.json`` keeps of a run's self-check: the figures and flags per class."""
    keep = ("held_out", "probes", selfcheck.FIGURE, "paired", "pixel_auroc", "flagged")
    return {"figure": check["figure"], "flag_below": check["flag_below"],
            "flagged": check["flagged"],
            "classes": {name: {k: row[k] for k in keep if k in row}
                        for name, row in check["classes"].items()}}


def _class_runs(runs: dict) -> list[tuple[str, int, str, float, float, bool]]:
    """(structure, seed, class, self-check, image AUROC, flagged) of every run's classes."""
    out = []
    for structure, by_seed in runs.items():
        for seed in sorted(by_seed, key=int):
            result = by_seed[seed]
            check = result.get("self_check")
            if not check:
                continue
            for name, row in check["classes"].items():
                auroc = result["table"].get(name, {}).get("image_auroc")
                if auroc is not None:
                    out.append((structure, int(seed), name, float(row[selfcheck.FIGURE]),
                                float(auroc), bool(row["flagged"])))
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties at their mean rank); NaN under 3 pairs or when a
    side is constant."""
    if len(x) < 3:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def self_check_intro(runs: dict) -> str:
    """The self-check section's first paragraph: what it is and the rank correlations."""
    rows = _class_runs(runs)
    parts = []
    for structure in [*runs, "all"]:
        picked = [r for r in rows if structure in ("all", r[0])]
        if picked:
            rho = spearman([r[3] for r in picked], [r[4] for r in picked])
            parts.append(f"{structure} {'–' if math.isnan(rho) else f'{rho:.3f}'} "
                         f"(n = {len(picked)})")
    flagged = [r for r in rows if r[5]]
    return ("Self-check: each run's held-out normal training images against their cut-paste "
            "probes (no test image, no label), image AUROC per class; flagged below "
            f"{100 * selfcheck.FLAG_BELOW:.1f}. Spearman rank correlation with the image AUROC "
            "on the real defects over (run, class): " + "; ".join(parts) + ". Flagged "
            f"class-runs: {len(flagged)} of {len(rows)}.")


SELF_CHECK_HEADERS = ["class", "structure", "self-check", "image AUROC", "flagged runs"]


def self_check_rows(runs: dict, classes: Sequence[str]) -> list[list[str]]:
    """Per class and structure: both figures' mean ± std over seeds and the flagged seeds
    (with their figure and image AUROC)."""
    rows = _class_runs(runs)
    out = []
    for name in classes:
        for structure in runs:
            mine = [r for r in rows if r[0] == structure and r[2] == name]
            if not mine:
                continue
            cells = [_cell(_stats([r[i] for r in mine])) for i in (3, 4)]
            flags = ", ".join(f"seed {r[1]} ({100 * r[3]:.1f}; image AUROC {100 * r[4]:.1f})"
                              for r in mine if r[5])
            out.append([name, structure, *cells, flags or "none"])
    return out


def self_check_markdown(runs: dict, classes: Sequence[str]) -> list[str]:
    """The self-check's section of ``compare.md`` (no line when no run has one)."""
    rows = self_check_rows(runs, classes)
    if not rows:
        return []
    return ["", "## Self-check beside image AUROC", "", self_check_intro(runs), "",
            "| " + " | ".join(SELF_CHECK_HEADERS) + " |",
            "|---|" + "---|" * (len(SELF_CHECK_HEADERS) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _settings_of(config: TrainConfig, probes: list[str], probe_count: int,
                 seeds: list[int], structures: list[str]) -> dict[str, Any]:
    shared = dataclasses.asdict(config)
    for key in ("structure", "seed", "device", "workers", "pin_memory"):
        shared.pop(key)
    return {**shared, "probes": probes, "probe_count": probe_count, "seeds": seeds,
            "structures": structures}


def compare(out_dir: str | os.PathLike, base: TrainConfig, seeds: Sequence[int] = (0, 1, 2),
            structures: Sequence[str] = STRUCTURES, probes: Sequence[str] = PROBE_KINDS,
            probe_count: int = 8) -> dict:
    """Train and evaluate every (structure, seed); write ``compare.json`` and ``compare.md``.

    Args:
        out_dir: the comparison folder (created; a rerun into it skips finished runs).
        base: what the runs share (data, data_seed, backbone, image size, epochs, ...);
            its ``structure`` and ``seed`` are replaced per run; ``data_seed`` None means 0.
        seeds: training seeds.
        structures: among ``"snl"``, ``"rd"``.
        probes: cross-class probe kinds added to the evaluation.
        probe_count: probe images per class and kind.

    Returns:
        The content of ``compare.json``.

    Raises:
        snl.cli.CommandError: ``out_dir`` holds a comparison with other shared settings.
        ValueError: a bad structure, seed list or probe kind.
    """
    structures = list(dict.fromkeys(structures))
    bad = [s for s in structures if s not in STRUCTURES]
    if bad or not structures:
        raise ValueError(f"structures must be among {', '.join(STRUCTURES)}, got {structures}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds}")
    probes = parse_kinds(list(probes))
    world = distributed.setup(base.device)
    if world.distributed:
        raise CommandError("snl compare runs in one process; start it without torchrun")
    config = dataclasses.replace(base, data_seed=0 if base.data_seed is None else base.data_seed)
    config = config.resolved(world.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings_of(config, probes, probe_count, seeds, structures)
    settings_path = out_dir / "settings.json"
    if settings_path.exists():
        # A loss option the folder's runs predate had the one behaviour of that time, the
        # first formulation's (as for checkpoints, TrainConfig.from_saved).
        old = {**V1_FORMULATION, **BEFORE_SELF_CHECK, **BEFORE_PRECISION,
               **json.loads(settings_path.read_text())}
        keep = ("seeds", "structures")
        differ = sorted(k for k in set(old) | set(settings)
                        if k not in keep and old.get(k) != settings.get(k))
        if differ:
            raise CommandError(
                f"snl compare: {out_dir} holds a comparison with other settings ("
                + ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now"
                            for k in differ) + "); choose another --name")
    report.write_json(settings_path, settings)
    data_root = resolve_data(config, world)
    classes = config.class_list()
    check_dataset(data_root, classes)  # every bad file listed before the first run
    probe_root = None
    if probes:
        listing = TestDataset(data_root, classes, size=config.image_size, mean=(0, 0, 0),
                              std=(1, 1, 1))
        probe_root = make_probes(data_root, out_dir / "probes", listing.classes, probes,
                                 seed=config.data_seed, size=config.image_size,
                                 count=probe_count)
    # Seed by seed, the structures in turn: a machine whose speed drifts during the comparison
    # slows both alike, so their training times stay comparable.
    plan = [(structure, seed) for seed in seeds for structure in structures]
    runs: dict[str, dict[str, dict]] = {}
    for k, (structure, seed) in enumerate(plan, 1):
        run_dir = out_dir / "runs" / f"{structure}-seed{seed}"
        result_path = run_dir / "result.json"
        head = f"compare: run {k}/{len(plan)}: {structure}, seed {seed}"
        if result_path.exists():
            log(world, f"{head}: finished before, kept ({result_path})")
            runs.setdefault(structure, {})[str(seed)] = json.loads(result_path.read_text())
            continue
        resume = (run_dir / "checkpoints" / "last.pt").exists()
        log(world, f"{head}{' (resuming)' if resume else ''} in {run_dir}")
        run_config = dataclasses.replace(config, structure=structure, seed=seed)
        model = train(run_config, run_dir, resume=resume, world=world, evaluate_after=False)
        history = json.loads((run_dir / "history.json").read_text())
        check = selfcheck.read(run_dir) if config.self_check else None
        evaluation = evaluate_all(model, data_root, classes, config.image_size, run_dir, world,
                                  dataclasses.asdict(run_config), probes=probes,
                                  probe_seed=config.data_seed, probe_root=probe_root,
                                  probe_count=probe_count, quiet=True, self_check=check)
        result = {"structure": structure, "seed": seed, "table": evaluation.table,
                  "by_type": evaluation.by_type,
                  "train_seconds": float(sum(h["seconds"] for h in history))}
        if check is not None:
            result["self_check"] = _kept_self_check(check)
        _write_atomic(result_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
        runs.setdefault(structure, {})[str(seed)] = result
        mean = evaluation.table.get("mean", {})
        log(world, f"{head}: done, mean image AUROC {100 * mean.get('image_auroc', math.nan):.1f}"
                   f", AUPRO {100 * mean.get('aupro', math.nan):.1f}"
                   + (f", self-check flags {', '.join(check['flagged']) or 'no class'}"
                      if check is not None else ""))
        _write_summary(out_dir, runs, settings, len(plan))
    final = _write_summary(out_dir, runs, settings, len(plan))
    log(world, f"comparison: {out_dir / 'compare.md'}")
    return final


def _write_summary(out_dir: Path, runs: dict, settings: dict, total: int) -> dict:
    done = sum(len(v) for v in runs.values())
    summary = summarize(runs)
    seconds = {s: [r["train_seconds"] for r in by_seed.values()] for s, by_seed in runs.items()}
    content = {"settings": settings, "spread": SPREAD, "runs_finished": done,
               "runs_planned": total, "runs": runs, "summary": summary}
    _write_atomic(out_dir / "compare.json", json.dumps(content, indent=2, sort_keys=True)
                  + "\n")
    _write_atomic(out_dir / "compare.md", markdown(summary, settings, done, total, seconds,
                                                   runs))
    html_report.write(out_dir / "report.html", html_page(out_dir, summary, settings, runs, done,
                                                         total, seconds))
    return content


def html_page(out_dir: Path, summary: dict, settings: dict, runs: dict, done: int, total: int,
              seconds: dict[str, list[float]]) -> str:
    """The text of the comparison's ``report.html`` (:mod:`snl.html_report`)."""
    h = html_report
    structures = list(summary)
    classes, kinds = _order(summary)
    intro = (f"Backbone {settings['backbone']}, {settings['image_size']} px, "
             f"{settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['lr']}; "
             f"data: {settings['data'] or 'embedded default set'} (data seed "
             f"{settings['data_seed']}); probes: {', '.join(settings['probes']) or 'none'}. "
             f"Metrics in percent, mean ± std over training seeds {settings['seeds']} ({SPREAD})."
             f" Runs finished: {done}/{total}.")
    labels = [label for _, label in report.METRIC_COLUMNS]
    mean_rows = []
    for structure in structures:
        row = summary[structure].get("mean", {}).get(ALL, {})
        secs = seconds.get(structure) or []
        mean_rows.append([structure] + [_cell(row.get(k)) for k, _ in report.METRIC_COLUMNS]
                         + [f"{np.median(secs):.0f}" if secs else "–"])
    ratio = time_ratio(seconds)
    if ratio:
        intro += f" Training time per run (median), SNL over RD: {ratio:.2f}."
    sections = [h.paragraph(intro),
                h.section("Mean over classes (type all: good against every real defect type)",
                          h.table(["structure", *labels, "train s/run"], mean_rows))]
    rows = self_check_rows(runs, classes)
    if rows:
        sections.append(h.section("Self-check beside image AUROC",
                                  h.paragraph(self_check_intro(runs)),
                                  h.table(SELF_CHECK_HEADERS, rows)))
    diff = len(structures) == 2
    for key, label in TYPE_METRICS:
        rows, bold = [], []
        for name, kind, cells in _metric_rows(summary, classes, kinds, key):
            if name == "mean":
                bold.append(len(rows))
            rows.append([name, kind, *cells])
        heads = ["class", "type", *structures] + ([f"{structures[0]} − {structures[1]}"]
                                                  if diff else [])
        sections.append(h.section(f"{label} per class and defect type", h.table(heads, rows, bold),
                                  level=3))
    roc, pro, styles = {}, {}, {}
    for structure, by_seed in runs.items():
        if not by_seed:
            continue
        seed = min(by_seed, key=int)
        path = out_dir / "runs" / f"{structure}-seed{seed}" / "curves.json"
        if not path.is_file():
            continue
        curves = json.loads(path.read_text())
        for kind, target in (("roc", roc), ("pro", pro)):
            for name, points in curves.get(kind, {}).items():
                label = f"{structure} {name}"
                target[label] = (np.asarray(points["fpr"]), np.asarray(points["y"]))
                styles[label] = "-" if structure == structures[0] else "--"
    if roc or pro:
        sections.append(h.section(
            "Curves (first seed of each structure)",
            '<div class="curves">' + h.img_tag(h.curves_png(
                roc, "image-level ROC", "false positive rate", "true positive rate",
                diagonal=True, styles=styles), "image-level ROC curves")
            + h.img_tag(h.curves_png(pro, "PRO up to FPR 0.3", "false positive rate (normal "
                                     "pixels)", "per-region overlap", xlim=0.3, styles=styles),
                        "PRO curves") + "</div>"))
    links = []
    for structure, by_seed in runs.items():
        for seed in sorted(by_seed, key=int):
            rel = f"runs/{structure}-seed{seed}/report.html"
            if (out_dir / rel).is_file():
                links.append(f'<li><a href="{rel}">{structure}, seed {seed}</a></li>')
    if links:
        sections.append(h.section(
            "Runs", h.paragraph("Each run's own report: its tables, curves and, for every class, "
                                "the grid of test images with their maps (the misses included)."),
            "<ul>" + "".join(links) + "</ul>"))
    title = " vs ".join(s.upper() for s in structures)
    return h.page(title, sections)


__all__ = ["SPREAD", "STRUCTURES", "compare", "markdown", "parse_ints", "spearman",
           "summarize"]
