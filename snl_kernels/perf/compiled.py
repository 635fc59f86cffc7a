"""What each Triton launch of an op compiles to for sm_90, read without a GPU.

Run in a process *without* ``TRITON_INTERPRET``. A stand-in driver reports an sm_90 GPU,
and every launch (the library's, routed through ``snl_kernels._triton.launch.hook``, and any
made directly) goes through Triton's own ``JITFunction.run`` as a warm-up: the binder
specialises the arguments and the kernel is compiled to a cubin, not run (CPU tensors stand
in for CUDA ones; their allocations are 64-byte aligned like a GPU allocator's, so the
divisibility attributes are those of a GPU launch). Per launch this records the grid (at the
real shape: nothing runs, so the benchmark shapes cost only compile time), the warps, the
arguments the JIT binds; per compiled kernel, from its cubin and IR:

- registers, local memory (spills), shared memory (``cuobjdump --dump-resource-usage``);
- in the SASS (``cuobjdump -sass``): ``HGMMA`` (wgmma), ``HMMA`` (mma.sync) and ``FFMA``
  counts, the widest global load (``LDG.E.128``: 16 bytes), ``BAR.SYNC`` and
  ``WARPGROUP.DEPBAR`` counts;
- in the TTGIR: ``warp_group_dot_wait`` ops with ``pendings = 0`` inside an ``scf.for``
  body (a loop that waits for each wgmma group before issuing the next);
- blocks per SM on an H100/H200 from registers, shared memory and warps.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Per SM on sm_90 (H100 / H200): registers, shared memory, warps, blocks; the shared
#: memory one block may opt into and the runtime's reserve per block.
SM90 = {"regs": 65536, "shared": 233472, "warps": 64, "blocks": 32,
        "shared_per_block": 232448, "reserved_shared": 1024}


@dataclass
class Kernel:
    """One compiled specialisation."""

    name: str
    num_warps: int
    num_stages: int
    registers: int
    local_bytes: int
    shared_bytes: int
    hgmma: int
    hmma: int
    ffma: int
    widest_load_bits: int
    bar_sync: int
    wgmma_waits: int
    waits_all_in_loop: int  # warp_group_dot_wait {pendings = 0} inside an scf.for

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0

    @property
    def blocks_per_sm(self) -> int:
        threads = 32 * self.num_warps
        per_warp = -(-self.registers * 32 // 256) * 256  # allocated per warp, 256 at a time
        by_regs = SM90["regs"] // max(per_warp * self.num_warps, 1)
        by_shared = SM90["shared"] // (self.shared_bytes + SM90["reserved_shared"])
        return max(0, min(SM90["blocks"], SM90["warps"] * 32 // threads, by_regs, by_shared))


@dataclass
class CompiledLaunch:
    kernel: str
    grid: tuple[int, int, int]
    args: int  # arguments passed to the JIT (its binder handles each)
    key: str  # which compiled specialisation (see ``kernels``)
    host_us: float | None = None  # one launch as the library makes it, driver call excluded
    #: made through the library's pre-bound launcher (snl_kernels._triton.launch), whose
    #: later launches of the same specialisation skip Triton's binder
    bound: bool = False


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_tool(name: str, flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(name), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


_LOAD_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def analyse_sass(sass: str) -> dict:
    """Counts of the instructions the model reads from sm_90 SASS text."""
    widest = 0
    for suffixes in re.findall(r"\bLDG(?:STS)?\.E((?:\.[A-Z0-9_]+)*)", sass):
        bits = 32
        for part in suffixes.split(".")[1:]:
            bits = _LOAD_BITS.get(part, bits)
        widest = max(widest, bits)
    return {
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "ffma": len(re.findall(r"\bFFMA\b", sass)),
        "widest_load_bits": widest,
        "bar_sync": len(re.findall(r"\bBAR\.SYNC", sass)),
        "wgmma_waits": len(re.findall(r"\bWARPGROUP\.DEPBAR", sass)),
    }


def waits_all_in_loops(ttgir: str) -> int:
    """``warp_group_dot_wait`` ops with ``pendings = 0`` inside an ``scf.for`` body."""
    stack: list[bool] = []  # per open region: is it (inside) a for loop
    found = 0
    for line in ttgir.splitlines():
        text = line.strip()
        closes = len(re.match(r"^\}*", text).group(0))
        for _ in range(min(closes, len(stack))):
            stack.pop()
        in_loop = bool(stack) and stack[-1]
        if "warp_group_dot_wait" in text and re.search(r"pendings\s*=\s*0\b", text) and in_loop:
            found += 1
        opens = text.count("{") - text.count("}") + closes
        # attribute dictionaries ({pendings = 0 : i32}) open and close on the same line
        for _ in range(max(opens, 0)):
            stack.append(in_loop or "scf.for" in text)
    return found


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) per thread."""
    out = _run_tool("cuobjdump", "--dump-resource-usage", cubin)
    found = re.search(r"REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[:200]!r}")
    return int(found.group(1)), int(found.group(2))


def analyse(kernel) -> Kernel:
    """A Triton ``CompiledKernel``'s resources and instructions."""
    cubin = kernel.asm["cubin"]
    regs, local = resources(cubin)
    sass = analyse_sass(_run_tool("cuobjdump", "-sass", cubin))
    meta = kernel.metadata
    return Kernel(name=kernel.name if hasattr(kernel, "name") else meta.name,
                  num_warps=meta.num_warps, num_stages=meta.num_stages, registers=regs,
                  local_bytes=local, shared_bytes=getattr(meta, "shared", 0), **sass,
                  waits_all_in_loop=waits_all_in_loops(kernel.asm["ttgir"]))


class Recorder:
    """Routes every Triton launch of this process through a warm-up compile for sm_90 and
    records it. ``launches``: in order; ``kernels``: {key: Kernel}."""

    def __init__(self, arch: int = 90, host_time: bool = True):
        self.arch = arch
        self.host_time = host_time
        self.launches: list[CompiledLaunch] = []
        self.kernels: dict[str, Kernel] = {}
        self.active = False
        self.timing = False

    def install(self) -> None:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("snl_kernels.perf.compiled compiles kernels: unset "
                               "TRITON_INTERPRET")
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        target = GPUTarget("cuda", self.arch, 32)
        driver.set_active(_fake_cuda_driver(target) if self.host_time else
                          _TargetDriver(target))
        real_run = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            # Launches made directly (fn[grid](...)); the library's go through on_launch.
            kernel = real_run(fn, *args, grid=grid, warmup=True, **kwargs)
            if recorder.active and not warmup and not recorder.timing:
                recorder.record(fn, kernel, grid)
                if recorder.host_time:
                    recorder.launches[-1].host_us = recorder.time(
                        lambda: real_run(fn, *args, grid=grid, warmup=False, **kwargs))
            return kernel

        def on_launch(fn, grid, args, options):
            # The library's launches (snl_kernels._triton.launch): timed through its
            # pre-bound path, the one they take.
            kernel = real_run(fn, grid=grid, warmup=True, **args, **options)
            if recorder.active:
                recorder.record(fn, kernel, grid)
                recorder.launches[-1].bound = True
                if recorder.host_time:
                    recorder.launches[-1].host_us = recorder.time(
                        lambda: launch_module.bound(fn, grid, args, options))

        JITFunction.run = run
        from .._triton import launch as launch_module

        launch_module.hook = on_launch
        # The ops' backend choice: CPU tensors stand in for CUDA ones here.
        from .. import dispatch

        dispatch.triton_interpreted = lambda: True

    def time(self, launch) -> float:
        """:func:`_time_launch` of ``launch``, its inner launches not recorded."""
        self.timing = True
        try:
            return _time_launch(launch)
        finally:
            self.timing = False

    def record(self, fn, kernel, grid) -> None:
        key = kernel.hash if hasattr(kernel, "hash") else str(id(kernel))
        if key not in self.kernels:
            self.kernels[key] = analyse(kernel)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        self.launches.append(CompiledLaunch(fn.__name__, tuple(int(g) for g in grid),
                                            len(fn.params), key))


def _time_launch(launch, calls: int = 40, repeats: int = 7) -> float:
    """Microseconds per launch: the least mean over ``repeats`` runs of ``calls`` launches."""
    launch()  # builds the launcher and loads the module on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            launch()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _driver_entry_points() -> set[str]:
    """The driver functions this Triton's CUDA driver and launcher sources call."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia"
    names = set()
    for source in ("driver.c", "driver.py"):
        path = folder / source
        if path.exists():
            names |= set(re.findall(r"\b(cu[A-Z][A-Za-z0-9]*)\b", path.read_text()))
    return {n for n in names if not n.endswith("Handle")}


def fake_libcuda_dir() -> str:
    """A folder with ``libcuda.so.1`` (and ``libcuda.so``) built from fake_libcuda.c, plus a
    function returning CUDA_SUCCESS for each entry point of this Triton it lacks."""
    src = Path(__file__).with_name("fake_libcuda.c")
    text = src.read_text()
    defined = set(re.findall(r"^CUresult (cu[A-Za-z0-9]*)\(", text, re.M))
    extra = sorted(_driver_entry_points() - defined)
    code = text + "".join(f"\nCUresult {name}(void) {{ return 0; }}" for name in extra) + "\n"
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"snl-perf-fake-libcuda-{digest}"
    lib = folder / "libcuda.so.1"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial, c_file = folder / f"libcuda.so.1.{os.getpid()}", folder / "fake_libcuda.c"
        c_file.write_text(code)
        subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2",
                        "-Wl,-soname,libcuda.so.1", "-o", str(partial), str(c_file)],
                       check=True)
        os.replace(partial, lib)
    link = folder / "libcuda.so"
    if not link.exists():
        try:
            link.symlink_to("libcuda.so.1")
        except FileExistsError:
            pass
    return str(folder)


def _fake_cuda_driver(target):
    """Triton's own CUDA driver (its cuda_utils and per-signature C launchers, compiled here)
    over the fake libcuda, reporting an sm_<arch> device 0 and stream 0."""
    folder = fake_libcuda_dir()
    # Loaded first under its soname: Triton's modules and dlopen("libcuda.so.1") get it.
    ctypes.CDLL(os.path.join(folder, "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    os.environ["TRITON_LIBCUDA_PATH"] = folder
    from triton.backends.nvidia.driver import CudaDriver

    fake = CudaDriver()
    # GPUDriver's constructor sets these from torch.cuda on the instance.
    fake.get_current_target = lambda: target
    fake.get_current_device = lambda: 0
    fake.get_current_stream = lambda device=None: 0
    return fake


class _TargetDriver:
    """Stands in for Triton's GPU driver: an sm_<arch> GPU as device 0, stream 0."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def __getattr__(self, name):
        raise AttributeError(f"the performance model's stand-in driver has no {name!r}")


@functools.cache
def recorder() -> Recorder:
    """The process's one recorder, installed."""
    r = Recorder()
    r.install()
    return r
