"""Benchmark fixtures; the harness itself is ``harness.py`` (imported by name, which a module
called ``conftest`` cannot be when ``tests`` and ``benchmarks`` run in one session)."""

from __future__ import annotations

import pytest
from harness import measure_copy_bandwidth


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    return measure_copy_bandwidth()
