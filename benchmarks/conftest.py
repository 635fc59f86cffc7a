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
