"""Test session setup: Triton's interpreter on CPU-only machines (set by importing
``support`` first), and the test files left out when the data dependencies are missing.

Shared helpers live in ``support.py`` (``from support import ...``), not here: a module named
``conftest`` cannot be imported by name when ``tests`` and ``benchmarks`` run in one session.
"""

from __future__ import annotations

import importlib.util

import pytest
import support  # noqa: F401  (sets TRITON_INTERPRET before any kernel module is imported)

# snl.data and snl.metrics need scipy and Pillow (core dependencies, but a bare GPU machine
# may lack them): their test files are left out, and the header says so.
MISSING_DATA_DEPS = [m for m in ("scipy", "PIL") if importlib.util.find_spec(m) is None]
collect_ignore = (["test_data.py", "test_metrics.py", "test_cli.py", "test_reference.py"]
                  if MISSING_DATA_DEPS else [])


def pytest_report_header(config):
    if MISSING_DATA_DEPS:
        return (f"not collected: {', '.join(collect_ignore)} "
                f"({', '.join(MISSING_DATA_DEPS)} not installed)")
    return None


@pytest.fixture(autouse=True)
def _fresh_recordings():
    """Each test starts with no recorded host programs (snl_kernels/_replay.py), as a new
    process does: a test that patches a launcher's internals sees them called."""
    from snl_kernels import _replay

    _replay.clear_all()
