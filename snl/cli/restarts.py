"""``snl train --restarts N``: train up to N seeds and keep the run the self-check prefers.

Seeds ``seed``, ``seed + 1``, ... are trained one after the other, each in
``RUN/restarts/seed<S>/`` (a run folder without evaluation: config, checkpoint, history,
``self_check.json``), until one the self-check (:mod:`snl.selfcheck`) flags no class of, or
N runs. The run it prefers (:func:`snl.selfcheck.preference`: fewest flagged classes, then
the highest lowest figure, then the highest mean) is moved into ``RUN`` and evaluated
there; the others stay in ``RUN/restarts/``. ``RUN/restarts.json`` records every run's
seed, time and figures, the kept seed, why, and the time the restarts added to one run.
The held-out images are the same for every seed (:func:`snl.data.split_holdout`), so the
runs' figures compare like for like.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from torch import nn

from .. import distributed, report, selfcheck
from .console import log
from .training import Fitted, TrainConfig, finish, fit

FILE = "restarts.json"


def _lowest(check: dict) -> str:
    figures = selfcheck.figures(check)
    name = min(figures, key=figures.get)
    return f"{name} {100 * figures[name]:.1f}"


def _flags(check: dict) -> str:
    return ", ".join(f"{name} {100 * check['classes'][name][selfcheck.FIGURE]:.1f}"
                     for name in check["flagged"])


def _reason(runs: list[dict], kept: int) -> str:
    """Why run ``kept`` of ``runs`` is the one kept, in one sentence."""
    check = runs[kept]["check"]
    flagged = [r for r in runs if r["check"]["flagged"]]
    if not check["flagged"]:
        before = "; ".join(f"seed {r['seed']} flagged {_flags(r['check'])}" for r in flagged)
        return ("the self-check flags none of its classes (lowest "
                f"{_lowest(check)})" + (f"; {before}" if before else ""))
    every = "; ".join(f"seed {r['seed']}: {_flags(r['check'])}" for r in runs)
    return (f"every seed was flagged ({every}); "
            f"seed {runs[kept]['seed']} has the fewest flagged classes "
            f"({len(check['flagged'])}), then the highest lowest figure ({_lowest(check)})")


def flagged_in_every_seed(runs: list[dict]) -> list[str]:
    """The classes every one of two or more runs flagged, in the first run's order."""
    if len(runs) < 2:
        return []
    return [name for name in runs[0]["check"]["flagged"]
            if all(name in r["check"]["flagged"] for r in runs[1:])]


def every_seed_line(runs: list[dict]) -> str | None:
    """One line on the classes flagged in every seed (None when there is none): a class the
    model separates poorly from cut-paste probes whatever the seed is more likely one it does
    not learn at this budget than a broken run, and more seeds are unlikely to help."""
    always = flagged_in_every_seed(runs)
    if not always:
        return None
    figures = "; ".join(
        f"{name} " + ", ".join(f"{100 * r['check']['classes'][name][selfcheck.FIGURE]:.1f}"
                                for r in runs) for name in always)
    return (f"restarts: flagged in all {len(runs)} seeds: {figures}. A class flagged whatever "
            "the seed is more likely one the model does not learn at this budget than a "
            "broken run; more seeds are unlikely to help")


def train_with_restarts(config: TrainConfig, run_dir: str | os.PathLike, restarts: int,
                        world: distributed.World | None = None) -> nn.Module:
    """Train up to ``restarts`` seeds from ``config.seed`` on; keep and evaluate one.

    Args:
        config: the runs' configuration (its ``seed`` is the first seed); the self-check
            must be on.
        run_dir: the run folder (the kept run ends up here).
        restarts: the most runs trained, at least 1.
        world: the process group (``distributed.setup()`` when None).

    Returns:
        The kept run's model.

    Raises:
        ValueError: ``restarts`` below 1, or the self-check off.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if not config.self_check:
        raise ValueError("restarts choose among seeds by the self-check, which is off "
                         "(self_check=False)")
    world = world or distributed.setup(config.device)
    run_dir = Path(run_dir)
    runs: list[dict] = []
    best: tuple[tuple, int, Fitted] | None = None
    for k in range(restarts):
        seed = config.seed + k
        folder = run_dir / "restarts" / f"seed{seed}"
        log(world, f"restarts: run {k + 1}/{restarts}: seed {seed} in {folder}")
        started = time.perf_counter()
        fitted = fit(dataclasses.replace(config, seed=seed), folder, world=world)
        check = distributed.broadcast_object(world, fitted.self_check)
        runs.append({"seed": seed, "seconds": time.perf_counter() - started, "check": check,
                     "folder": str(folder.relative_to(run_dir))})
        key = selfcheck.preference(check)
        if best is None or key > best[0]:
            best = (key, k, fitted)
        del fitted
        if not check["flagged"]:
            break
        if k + 1 < restarts:
            log(world, f"restarts: seed {seed} flagged ({_flags(check)}); trying seed "
                       f"{seed + 1}")
    assert best is not None
    _, kept, fitted = best
    total = sum(r["seconds"] for r in runs)
    extra = total - runs[0]["seconds"]
    reason = _reason(runs, kept)
    seed = runs[kept]["seed"]
    if world.is_main:
        source = run_dir / runs[kept]["folder"]
        for item in source.iterdir():
            os.replace(item, run_dir / item.name)
        source.rmdir()
    runs[kept]["folder"] = "."
    distributed.barrier(world)
    log(world, f"restarts: kept seed {seed} of {len(runs)} run(s): {reason}")
    always = every_seed_line(runs)
    if always is not None:
        log(world, always)
    log(world, f"restarts: {extra:.0f} s more than one run ({len(runs)} run(s), {total:.0f} s "
               "of training and self-checks in all)" if len(runs) > 1
        else "restarts: no restart needed, no extra time")
    if world.is_main:
        report.write_json(run_dir / FILE, {
            "restarts": restarts, "kept_seed": seed, "reason": reason,
            "extra_seconds": extra, "total_seconds": total,
            "flagged_in_every_seed": flagged_in_every_seed(runs),
            "runs": [{"seed": r["seed"], "seconds": r["seconds"], "folder": r["folder"],
                      "self_check": selfcheck.figures(r["check"]),
                      "flagged": r["check"]["flagged"]} for r in runs]})
    finish(fitted, run_dir, world)
    for line in selfcheck.warning_lines(fitted.self_check):
        log(world, line)
    return fitted.model
