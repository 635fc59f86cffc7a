"""Build snl-kernels, with the CUDA extension ``snl_kernels._C`` wherever it can be built.

The extension (``csrc/*.cpp``, ``csrc/*.cu``) is built when PyTorch is a CUDA build and a CUDA
toolkit (``bin/nvcc``, ``include/cuda_runtime.h``, ``lib64/libcudart.so``) is found whose major
version matches PyTorch's. Otherwise the package installs without it (the Triton and reference
backends remain) and one line says why. setup.py imports torch, so install torch first and build
without isolation::

    pip install --no-build-isolation .        # or -e . ; or: python setup.py build_ext --inplace

Environment:
    SNL_SKIP_CUDA_BUILD=1  never build the extension.
    SNL_FORCE_CUDA=1       build it or fail (CI sets it, so that a skipped build is an error).
    CUDA_HOME, CUDA_PATH   the toolkit; when unset or incomplete, the ``cuda`` folder beside
                           nvcc's prefix and /usr/local/cuda are tried.
    TORCH_CUDA_ARCH_LIST   target GPUs, read by PyTorch; default here "8.0;9.0+PTX"
                           (sm_80 and sm_90 code, plus PTX for later GPUs).
    MAX_JOBS               parallel compile jobs (PyTorch's ninja build).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "snl_kernels._C"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# Stable-ABI floor for the extension (PyTorch defines Py_LIMITED_API to match, 3.10).
LIMITED_API_TAG = "cp310"


def _say(message: str) -> None:
    print(f"snl-kernels setup: {message}", flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _is_toolkit(path: str) -> bool:
    required = (("bin", "nvcc"), ("include", "cuda_runtime.h"), ("lib64", "libcudart.so"))
    return bool(path) and all(os.path.exists(os.path.join(path, *parts)) for parts in required)


def _find_toolkit() -> tuple[str | None, str]:
    """Return (toolkit folder, how it was found), or (None, why none was usable)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((os.environ[var], f"${var}"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper or link (e.g. /usr/local/bin/nvcc) whose prefix is no toolkit.
        for path in dict.fromkeys([nvcc, os.path.realpath(nvcc)]):
            prefix = os.path.dirname(os.path.dirname(path))
            candidates.append((prefix, f"prefix of {path}"))
            candidates.append((os.path.join(prefix, "cuda"), f"the cuda folder beside {path}"))
    candidates.append(("/usr/local/cuda", "default location"))

    for path, how in candidates:
        if _is_toolkit(path):
            if candidates[0][0] != path and candidates[0][1].startswith("$"):
                var, bad = candidates[0][1], candidates[0][0]
                how += f"; {var[1:]}={bad} lacks bin/nvcc, include/ or lib64/libcudart.so"
            return path, how
    tried = ", ".join(dict.fromkeys(path for path, _ in candidates))
    return None, (
        "no CUDA toolkit found (bin/nvcc, include/cuda_runtime.h, lib64/libcudart.so) in "
        f"{tried}; set CUDA_HOME"
    )


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _pip_cuda_include_dirs(torch) -> list[str]:
    """include/ folders of NVIDIA's pip wheels (site-packages/nvidia/*/include).

    PyTorch's pip builds take cuBLAS, cuSPARSE, ... from these wheels, and
    ATen/cuda/CUDAContext.h includes their headers, which a bare toolkit may lack.
    """
    roots = [os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")]
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    dirs = []
    for root in dict.fromkeys(os.path.realpath(r) for r in roots):
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return list(dict.fromkeys(dirs))


def _cublas_library(cuda_home: str) -> str | None:
    """The cuBLAS shared library to link: the one PyTorch has loaded (from its wheels or the
    toolkit; read off /proc/self/maps), else the toolkit's. At run time the extension then
    shares PyTorch's copy, found by its soname."""
    try:
        with open("/proc/self/maps") as maps:
            loaded = [line.split()[-1] for line in maps if "/libcublas.so" in line]
    except OSError:
        loaded = []
    candidates = loaded + sorted(glob.glob(os.path.join(cuda_home, "lib64", "libcublas.so*")))
    return next((path for path in candidates if os.path.exists(path)), None)


def _cuda_toolkit_or_reason():
    """Return (torch, toolkit folder, None) when the extension can be built, else (.., .., why)."""
    if _env_flag("SNL_SKIP_CUDA_BUILD"):
        return None, None, "SNL_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError as exc:
        return None, None, (
            f"PyTorch is not importable ({exc}); install torch first, then "
            "`pip install --no-build-isolation .`"
        )
    if torch.version.cuda is None:
        return torch, None, f"PyTorch {torch.__version__} is a CPU build"
    cuda_home, how = _find_toolkit()
    if cuda_home is None:
        return torch, None, how
    version = _nvcc_version(cuda_home)
    if version is None:
        return torch, None, f"{cuda_home}/bin/nvcc --version failed"
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return torch, None, (
            f"nvcc {version} in {cuda_home} does not match CUDA {torch.version.cuda} of "
            f"PyTorch {torch.__version__}; point CUDA_HOME at a CUDA {torch.version.cuda} toolkit"
        )
    _say(f"using CUDA {version} toolkit {cuda_home} ({how})")
    return torch, cuda_home, None


def _cuda_extension(torch, cuda_home: str):
    # PyTorch reads CUDA_HOME when torch.utils.cpp_extension is first imported.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Without it PyTorch targets the visible GPUs, and fails when there are none.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    _say(f"building {EXTENSION} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

    # -isystem, not -I: searched after the toolkit's include/, so only what it lacks comes
    # from the wheels.
    system_includes = []
    for path in _pip_cuda_include_dirs(torch):
        system_includes += ["-isystem", path]
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT)) + sorted(
        glob.glob("csrc/*.cu", root_dir=ROOT)
    )
    # No --use_fast_math: sqrt and division stay IEEE-exact, as in the reference. No -std:
    # BuildExtension adds the standard that the installed PyTorch's headers need.
    cublas = _cublas_library(cuda_home)
    if cublas is None:
        sys.exit(f"snl-kernels setup: no libcublas.so found (PyTorch's, or in {cuda_home}/lib64)")
    _say(f"linking {cublas}")
    extension = cpp_extension.CUDAExtension(
        EXTENSION,
        sources,
        extra_link_args=[cublas],
        depends=sorted(glob.glob("csrc/*.h", root_dir=ROOT)
                       + glob.glob("csrc/*.cuh", root_dir=ROOT)),
        extra_compile_args={
            "cxx": ["-O3", *system_includes],
            "nvcc": ["-O3", "-lineinfo", *system_includes],
        },
        py_limited_api=True,
    )
    return extension, cpp_extension.BuildExtension


def _setup_kwargs() -> dict:
    torch, cuda_home, reason = _cuda_toolkit_or_reason()
    if reason is not None:
        if _env_flag("SNL_FORCE_CUDA") and not _env_flag("SNL_SKIP_CUDA_BUILD"):
            sys.exit(f"snl-kernels setup: SNL_FORCE_CUDA is set, but {reason}")
        _say(f"not building the CUDA extension {EXTENSION}: {reason}")
        return {}
    extension, build_extension = _cuda_extension(torch, cuda_home)
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": build_extension},
        "options": {"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}},
    }


setup(**_setup_kwargs())
