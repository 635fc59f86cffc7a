"""Every Triton kernel compiles for sm_90 (H100/H200), checked on machines without a GPU.

The CPU interpreter runs the kernels' arithmetic but not Triton's code generation, whose
layout, shape and type rules only a real compile applies. ``scripts/triton_compile_check.py``
compiles each specialisation the library launches to a cubin without a driver.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import HAS_GPU, NO_TRITON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
@pytest.mark.skipif(HAS_GPU, reason="on a GPU every kernel test compiles its kernels for real")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "triton_compile_check.py"), "--quick"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert " 0 failed " in result.stdout, output[-6000:]
