"""The sm_90 facts of every CUDA kernel of csrc/, read without a GPU: the CUDA side of the
performance model (the Triton side is ``compiled.Kernel``).

Each ``csrc/*.cu`` is compiled, one at a time, by ``nvcc -gencode arch=compute_90,code=sm_90
-cubin -O3`` with the extension's flags and include paths (setup.py, PyTorch's BuildExtension):
torch's headers from ``torch.utils.cpp_extension.include_paths()`` of this interpreter (a CUDA
build of PyTorch), ``-isystem`` the pip CUDA wheels' include dirs, csrc/. nvcc: $CUDA_HOME/bin
or PATH. From each cubin, with Triton's ``cuobjdump`` and binutils' ``c++filt``:

- per function: registers, local memory (``STACK`` + ``LOCAL``: spills, stack frame), static
  shared memory (``cuobjdump --dump-resource-usage``); the launch bound (``EIATTR_MAX_THREADS``
  of ``cuobjdump -elf``, else None); ``compiled.analyse_sass`` of that function's SASS alone
  (``cuobjdump -sass`` split at its ``Function :`` headers).

Kernels are keyed by the demangled name without return type or parameter list, as c++filt
prints it: ``snl::(anonymous namespace)::cosine_distances_fwd_pixel_kernel<float, 32, 4>``.
Results are cached as JSON in build/perf_cuda/, keyed by a sha256 of csrc/*, the nvcc version,
the flags and the PyTorch version. ``python -m snl_kernels.perf.cuda_sass`` prints the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .compiled import SM90, _tool, analyse_sass

ROOT = Path(__file__).resolve().parents[2]
#: As PyTorch's BuildExtension compiles the extension (COMMON_NVCC_FLAGS, its -std, defines).
NVCC_FLAGS = ["-gencode", "arch=compute_90,code=sm_90", "-cubin", "-O3", "-std=c++20",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "-DTORCH_EXTENSION_NAME=_C", "-DPy_LIMITED_API=0x030a0000"]


class CudaSassUnavailable(RuntimeError):
    """No nvcc, or no CUDA build of PyTorch to take the extension's headers from."""


def _toolchain() -> tuple[str, str, list[str]]:
    """(nvcc, its version line, include flags), or CudaSassUnavailable saying what is missing."""
    home = os.environ.get("CUDA_HOME")
    nvcc = (home and shutil.which("nvcc", path=os.path.join(home, "bin"))) or shutil.which("nvcc")
    if nvcc is None:
        raise CudaSassUnavailable("nvcc not found ($CUDA_HOME/bin, PATH): the CUDA kernels' "
                                  "SASS needs a CUDA toolkit")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = (re.findall(r"^Cuda compilation tools.*$", out, re.M) or [out.strip()])[-1]
    if shutil.which("c++filt") is None:
        raise CudaSassUnavailable("c++filt (binutils) is not on PATH")
    try:
        if not os.path.exists(_tool("cuobjdump")):
            raise CudaSassUnavailable(f"Triton has no cuobjdump ({_tool('cuobjdump')})")
    except ImportError as exc:
        raise CudaSassUnavailable(f"Triton (its cuobjdump) is not importable ({exc})") from exc
    quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise CudaSassUnavailable(f"PyTorch is not importable ({exc})") from exc
    finally:
        quiet.setLevel(level)
    includes = cpp_extension.include_paths()
    if torch.version.cuda is None or not any(
            (Path(p) / "ATen" / "cuda" / "CUDAContext.h").exists() for p in includes):
        raise CudaSassUnavailable(
            f"PyTorch {torch.__version__} ({Path(torch.__file__).parent}) is a CPU build, "
            "without usable ATen/cuda headers: run with the python of a CUDA build of PyTorch")
    wheels = sorted((Path(torch.__file__).parents[1] / "nvidia").glob("*/include"))
    flags = [f"-I{p}" for p in includes] + [a for p in wheels for a in ("-isystem", str(p))]
    return nvcc, f"{version}; torch {torch.__version__}", flags


def unavailable_reason() -> str | None:
    """Why ``kernel_facts`` cannot compile here, or None."""
    try:
        _toolchain()
    except CudaSassUnavailable as exc:
        return str(exc)
    return None


def split_sass(text: str) -> dict[str, str]:
    """``cuobjdump -sass`` text -> {mangled function name: its SASS lines}."""
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if header:
            current = functions.setdefault(header.group(1), [])
        elif current is not None and re.match(r"\s*\.{5,}\s*$", line):
            current = None  # the dotted line closing a function
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in functions.items()}


def kernel_name(demangled: str) -> str:
    """c++filt's ``void ns::k<float, 4>(float*, int)`` -> ``ns::k<float, 4>``."""
    end, depth = len(demangled), 0
    if demangled.endswith(")"):  # the parameter list: the last balanced (...)
        for end in range(len(demangled) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(demangled[end], 0)
            if depth == 0:
                break
    head, depth = demangled[:end], 0
    for i, c in enumerate(head):
        depth += {"<": 1, "(": 1, ">": -1, ")": -1}.get(c, 0)
        if c == " " and depth == 0:  # a return type before the name (templates)
            return head[i + 1:]
    return head


def base_name(key: str) -> str:
    """``ns::k<float, 4>`` -> ``k``: the name without scope or template arguments."""
    depth, kept = 0, []
    for c in key:
        depth += {"<": 1, ">": -1}.get(c, 0)
        if depth == 0 and c != ">":
            kept.append(c)
    return "".join(kept).split("::")[-1]


def _demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names) + "\n", capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return dict(zip(names, out, strict=True))


def _max_threads(elf: str) -> dict[str, int]:
    """EIATTR_MAX_THREADS (x, y, z) of each function's .nv.info section, as x * y * z."""
    found = {}
    for section in re.finditer(r"^\.nv\.info\.(\S+)$(.*?)(?=^\S|\Z)", elf, re.M | re.S):
        value = re.search(r"EIATTR_MAX_THREADS\s+Format:.*\n\s*Value:\s*((?:0x[0-9a-f]+ *)+)",
                          section[2])
        if value:
            found[section[1]] = math.prod(int(x, 16) for x in value[1].split())
    return found


def cubin_facts(cubin: str | Path) -> dict[str, dict]:
    """{kernel name: facts} of the __global__ functions of one sm_90 cubin."""
    def dump(*flags):
        return subprocess.run([_tool("cuobjdump"), *flags, str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    usage = {m.group(1): [int(g) for g in m.groups()[1:]] for m in re.finditer(
        r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
        dump("--dump-resource-usage"))}
    sass, bounds = split_sass(dump("-sass")), _max_threads(dump("-elf"))
    names = _demangle(sorted(sass))
    facts = {}
    for mangled, text in sass.items():
        regs, stack, shared, local = usage[mangled]
        facts[kernel_name(names[mangled])] = {
            "registers": regs, "local_bytes": stack + local, "shared_bytes": shared,
            "max_threads": bounds.get(mangled), **analyse_sass(text)}
    return facts


def _cache_key(root: Path, version: str) -> str:
    digest = hashlib.sha256(version.encode() + " ".join(NVCC_FLAGS).encode())
    for path in sorted((root / "csrc").iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def compile_report(root: str | Path | None = None, *, cache: bool = True) -> dict:
    """{"key", "toolchain", "compile_s": {file: seconds}, "kernels": {name: facts}}."""
    root = Path(root) if root is not None else ROOT
    nvcc, version, includes = _toolchain()
    key = _cache_key(root, version)
    cached = root / "build" / "perf_cuda" / f"{key}.json"
    if cache and cached.exists():
        return json.loads(cached.read_text())
    report = {"key": key, "toolchain": version, "compile_s": {}, "kernels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted((root / "csrc").glob("*.cu")):  # one at a time: compiles are big
            cubin, start = Path(tmp) / f"{source.stem}.cubin", time.perf_counter()
            run = subprocess.run([nvcc, *NVCC_FLAGS, *includes, f"-I{root / 'csrc'}", "-o",
                                  str(cubin), str(source)], capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"nvcc failed on {source.name}:\n{run.stderr[-4000:]}")
            report["compile_s"][source.name] = round(time.perf_counter() - start, 1)
            for name, facts in cubin_facts(cubin).items():  # a header's kernel: first .cu
                report["kernels"].setdefault(name, {**facts, "source": source.name})
    if cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(report, indent=1, sort_keys=True))
        partial.replace(cached)
    return report


def kernel_facts(root: str | Path | None = None, *, cache: bool = True) -> dict[str, dict]:
    """{kernel name: {registers, local_bytes, shared_bytes, max_threads, hgmma, hmma, ffma,
    widest_load_bits, bar_sync, wgmma_waits, source}} for every sm_90 kernel of csrc/*.cu."""
    return compile_report(root, cache=cache)["kernels"]


def blocks_per_sm(facts: dict, threads_per_block: int, dynamic_shared: int = 0) -> int:
    """Resident blocks per SM of an H100/H200 (sm_90) for one kernel's facts: registers
    (allocated per warp, 256 at a time), shared memory (1 KB reserved per block, 227 KB at
    most per block), 2048 threads and 32 blocks per SM; 0 where the launch cannot run."""
    warps = -(-threads_per_block // 32)
    shared = facts["shared_bytes"] + dynamic_shared
    if (facts.get("max_threads") and threads_per_block > facts["max_threads"]) \
            or shared > SM90["shared_per_block"] or threads_per_block > 1024:
        return 0
    per_warp = -(-facts["registers"] * 32 // 256) * 256
    by_regs = SM90["regs"] // max(per_warp * warps, 1)
    by_shared = SM90["shared"] // (shared + SM90["reserved_shared"])
    return max(0, min(SM90["blocks"], SM90["warps"] // warps, by_regs, by_shared))


def table(facts: dict[str, dict]) -> str:
    """One line per kernel (``snl::(anonymous namespace)::`` left out of the names)."""
    keys = ("registers", "local_bytes", "shared_bytes", "hgmma", "hmma", "ffma",
            "widest_load_bits", "bar_sync")
    rows = [("kernel", "regs", "local", "smem", "hgmma", "hmma", "ffma", "ldg", "bar")]
    rows += [(name.replace("snl::(anonymous namespace)::", ""), *(str(f[k]) for k in keys))
             for name, f in sorted(facts.items())]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}} " + " ".join(f"{c:>6}" for c in r[1:]) for r in rows)


if __name__ == "__main__":
    report = compile_report()
    print(table(report["kernels"]))
    print("compile seconds:", report["compile_s"], "|", report["toolchain"])
