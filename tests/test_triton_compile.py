"""Every Triton kernel compiles for sm_90 (H100/H200), checked on machines without a GPU.

The CPU interpreter runs the kernels' arithmetic but not Triton's code generation, whose
layout, shape and type rules only a real compile applies. ``scripts/triton_compile_check.py``
compiles each specialisation the library launches to a cubin without a driver, with the
attributes Triton's JIT gives that launch on a GPU (arguments divisible by 16, arguments
equal to 1 made constants).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import HAS_GPU, NO_TRITON

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# A kernel launched three times: 16-byte aligned pointer, n a multiple of 16 and stride 1;
# then a pointer 4 bytes in, odd n and stride 2; then the first launch again.
PROBE = '''
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, {scripts!r})
import triton_compile_check as check

compiler = check.Compiler(90)
compiler.install()


@triton.jit
def probe_kernel(x_ptr, n, stride, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(x_ptr + o * stride, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)


x = torch.zeros(64)
probe_kernel[(1,)](x, 32, 1, BLOCK=64)
probe_kernel[(1,)](x[1:], 33, 2, BLOCK=64)
probe_kernel[(1,)](x, 32, 1, BLOCK=64)
print("compiled", len(compiler.done), "failed", sum(v is not None for v in compiler.done.values()),
      "with divisibility", compiler.with_divisibility)
'''


def run_python(args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
def test_compile_check_gives_each_launch_the_jit_attributes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(scripts=str(SCRIPTS)))
    result = run_python([str(probe)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    attributes = re.findall(r"^ +div16: (.*?) \(\d", result.stdout, re.M)
    assert attributes == ["n,x_ptr; constants: stride=1", "-; constants: -"], output[-6000:]
    assert "compiled 2 failed 0 with divisibility 1" in result.stdout, output[-6000:]


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
@pytest.mark.skipif(HAS_GPU, reason="on a GPU every kernel test compiles its kernels for real")
def test_every_triton_kernel_compiles_for_sm90():
    result = run_python([str(SCRIPTS / "triton_compile_check.py"), "--quick"], ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = re.search(r"^(\d+) specialisations compiled for sm_90 in \d+ s, 0 failed "
                        r"\(triton [^)]*\); attributes: (\d+) with divisibility 16, (\d+) with "
                        r"arguments made constants$", result.stdout, re.M)
    assert summary, output[-6000:]
    compiled, divisible, constants = map(int, summary.groups())
    # The launches include shapes whose sizes and strides are multiples of 16, and contiguous
    # tensors (innermost stride 1): the attributes must have reached the compiler.
    assert divisible > 0, summary.group(0)
    assert constants > 0, summary.group(0)
    assert len(re.findall(r"^ok   ", result.stdout, re.M)) == compiled, output[-6000:]
