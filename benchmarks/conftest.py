"""Benchmark fixtures; the harness itself is ``harness.py`` (imported by name, which a module
called ``conftest`` cannot be when ``tests`` and ``benchmarks`` run in one session)."""

from __future__ import annotations

import pytest
from harness import measure_copy_bandwidth


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    return measure_copy_bandwidth()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Drop benchmarks that recorded no round before pytest-benchmark writes its JSON.

    A run stopped at a time limit (the GPU round's SIGINT) leaves the benchmark it was in
    without data, and pytest-benchmark then fails to write any JSON at all (min() of nothing).
    The finished benchmarks are kept; the interrupted one is named in the log.
    """
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None:
        empty = [b for b in bench_session.benchmarks if not b]
        if empty:
            bench_session.benchmarks[:] = [b for b in bench_session.benchmarks if b]
            names = ", ".join(getattr(b, "fullname", "?") for b in empty)
            print(f"\nbenchmarks without a finished round, left out of the JSON: {names}")
    yield


def step_ratios(benchmarks) -> list[str]:
    """Lines of SNL's median over RD's, per (kind, mode, path), from the benchmarks of
    ``bench_training_step.py`` (their ``extra_info``) that have both structures."""
    medians: dict[tuple, dict[str, float]] = {}
    for b in benchmarks:
        info = getattr(b, "extra_info", None) or {}
        stats = getattr(b, "stats", None)  # a Stats (the session's Metadata) or a Metadata
        stats = getattr(stats, "stats", stats)
        if info.get("kind") not in ("training_step", "inference") or stats is None:
            continue
        key = (info["kind"], info["mode"], "fused" if info["fused"] else "reference")
        medians.setdefault(key, {})[info["structure"]] = stats.median
    return [f"{kind} {mode} {path}: SNL {1e3 * m['snl']:.1f} ms, RD {1e3 * m['rd']:.1f} ms, "
            f"SNL / RD {m['snl'] / m['rd']:.2f}"
            for (kind, mode, path), m in sorted(medians.items()) if {"snl", "rd"} <= set(m)]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bench_session = getattr(config, "_benchmarksession", None)
    lines = step_ratios(getattr(bench_session, "benchmarks", None) or [])
    if lines:
        terminalreporter.section("SNL over RD (bench_training_step.py, medians)")
        for line in lines:
            terminalreporter.write_line(line)
