"""Shared test helpers: Triton's interpreter on CPU-only machines, tolerances, input makers.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so it is set here, on import;
``conftest.py`` imports this module before any test imports ``snl_kernels``' kernel modules.
On a machine with a CUDA GPU the kernels are compiled and the tests run on the GPU.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_GPU else "cpu"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Absolute floor of the error allowed against the float64 oracle, by input dtype. Inputs of
# every dtype are accumulated in fp32, so the floor is fp32-sized; low-precision *outputs*
# (gradients stored in fp16/bf16) are judged by the 2x rule in `assert_matches_oracle`.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}


def _why_no_triton() -> str | None:
    try:
        import triton
    except Exception as exc:
        return f"Triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        import numpy

        def major_minor(version: str) -> tuple[int, int]:
            return tuple(int(p) for p in version.split(".")[:2])  # type: ignore[return-value]

        # Triton 3.6's interpreter passes integer arguments as 1-element arrays and converts
        # them with int(), which numpy 2.4 refuses ("only 0-dimensional arrays can be
        # converted to Python scalars"; triton-lang/triton#9171). Compiled code is unaffected.
        if major_minor(triton.__version__) == (3, 6) and major_minor(numpy.__version__) >= (2, 4):
            return (f"Triton {triton.__version__}'s interpreter cannot run loops to a runtime "
                    f"bound with numpy {numpy.__version__} (needs numpy < 2.4; compiled "
                    "kernels are unaffected)")
    return None


def _why_no_cuda_backend() -> str | None:
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is a CPU build: no CUDA extension, no GPU"
    if not HAS_GPU:
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    from snl_kernels import _cuda

    if not _cuda.load():
        return (f"extension snl_kernels._C not built ({_cuda.load_error()}); "
                "run `pip install --no-build-isolation -e .`")
    return None


def _why_no_extension() -> str | None:
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is a CPU build: no CUDA extension"
    from snl_kernels import _cuda

    if not _cuda.load():
        return (f"extension snl_kernels._C not built ({_cuda.load_error()}); "
                "run `pip install --no-build-isolation -e .`")
    return None


NO_TRITON = _why_no_triton()
NO_CUDA_BACKEND = _why_no_cuda_backend()
#: Why snl_kernels._C cannot be loaded here (None when it can, GPU or not).
NO_EXTENSION = _why_no_extension()

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none visible)")


def kernel_backends() -> list:
    """The kernel backends as pytest params, each skipped with the reason it cannot run."""
    return [
        pytest.param("triton", marks=pytest.mark.skipif(NO_TRITON is not None,
                                                         reason=NO_TRITON or "")),
        pytest.param("cuda", marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(NO_CUDA_BACKEND is not None, reason=NO_CUDA_BACKEND or ""),
        ]),
    ]


def features(shape, dtype=torch.float32, device=DEVICE, seed=0, requires_grad=False):
    """A (teacher, student) pair of random features; the student is a noisy teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=g, dtype=torch.float64)
    student = teacher + 0.7 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = teacher.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    s = student.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return t, s


def oracle_inputs(*tensors):
    """float64 copies (requiring grad) of the exact values the kernel saw."""
    return [x.detach().double().requires_grad_(True) for x in tensors]


def assert_matches_oracle(actual, oracle, lowp=None, atol=2e-5, rtol=1e-5):
    """``actual`` is within tolerance of the float64 ``oracle``.

    With ``lowp`` (the reference's own result computed in the low-precision dtype), the
    flash-attention rule applies: the kernel's error may be at most twice the reference's
    own error in that dtype, plus ``atol``.
    """
    actual = actual.detach().double()
    oracle = oracle.detach().double().to(actual.device)
    if lowp is None:
        torch.testing.assert_close(actual, oracle, atol=atol, rtol=rtol)
        return
    err = (actual - oracle).abs().max().item()
    ref_err = (lowp.detach().double().to(actual.device) - oracle).abs().max().item()
    assert err <= 2 * ref_err + atol, (
        f"max error {err:.3g} > 2 x reference's own low-precision error {ref_err:.3g} + {atol:g}"
    )


def assert_fullgraph_compile_matches_eager(loss, teachers, students):
    """``torch.compile(loss, fullgraph=True)`` gives eager's loss and student gradients
    (students require grad; teachers do not)."""
    got = torch.compile(loss, fullgraph=True)(teachers, students)
    got.backward()
    grads = [s.grad.clone() for s in students]
    for s in students:
        s.grad = None
    want = loss(teachers, students)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, s in zip(grads, students, strict=True):
        torch.testing.assert_close(a, s.grad)


def require_model_extra() -> None:
    """Skip the calling test module (call it at module level) when timm, which the model
    and the command line need, cannot be imported."""
    try:
        import timm  # noqa: F401
    except Exception as exc:  # timm needs a torchvision matching the installed PyTorch
        pytest.skip(f"timm is not importable ({type(exc).__name__}: {exc}); the command needs "
                    "the model extra: pip install '.[model]'", allow_module_level=True)


def assert_cli_error(capsys, argv, status: int, match: str) -> str:
    """``snl ARGV`` returns ``status`` and prints one ``snl: error: ...`` message matching
    ``match`` (a regular expression), no traceback; returns the message."""
    from snl import cli

    capsys.readouterr()
    assert cli.main(argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("snl: error: "), err
    assert re.search(match, err), err
    assert "Traceback" not in err
    return err


def compiled_probe(script: str, **env: str) -> object:
    """Run ``tests/<script>`` in a process without the Triton interpreter (its kernels
    compiled for sm_90 over the performance model's stand-in driver) and return the JSON
    object its last line prints."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]),
                   **env)
    environ.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(root / "tests" / script)], env=environ,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
