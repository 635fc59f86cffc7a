"""Compile every Triton kernel of snl_kernels for a GPU target, on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels' arithmetic but not Triton's
compiler: layout, shape and type rules of real code generation go unchecked there. This
script replaces ``JITFunction.run`` with one that compiles the launch's specialisation to
a cubin with ``triton.compile`` (no driver, no GPU needed) instead of running it, then calls
each Triton op on CPU tensors of every dtype and flag combination the library uses, so
that every specialisation a GPU run would compile is compiled here.

    python scripts/triton_compile_check.py [--arch 90] [--quick]

``--quick``: float32 inputs and K <= 64 centres only (the test suite's setting; the full run
also compiles fp16/bf16 and K = 256, a few minutes more on a cold cache).

Prints one line per compiled specialisation (registers, spills, shared memory) and exits 1
if any failed to compile or needs more shared memory than a block may have on the target
(such a kernel compiles but cannot launch). The launch results are garbage (nothing runs).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles kernels, it does not interpret them")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
          torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# Shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class Compiler:
    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.done: dict[tuple, str | None] = {}

    def run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        bound = inspect.signature(fn.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for index, param in enumerate(fn.params):
            value = bound.arguments[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[(index,)] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = _TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {param.name} of type {type(value)}")
        key = (fn.__name__, tuple(sorted(signature.items())),
               tuple(sorted((k[0], repr(v)) for k, v in constexprs.items())),
               tuple(sorted(options.items())))
        if key in self.done:
            return None
        consts = {fn.params[k[0]].name: v for k, v in constexprs.items()}
        dtypes = sorted({v[1:] for v in signature.values() if v.startswith("*")})
        label = f"{fn.__name__} {'/'.join(dtypes)} {consts} {options or ''}"
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                      target=self.target, options=options)
        except Exception:
            self.done[key] = traceback.format_exc(limit=3)
            print(f"FAIL {label}\n{self.done[key]}", flush=True)
        else:
            shared = getattr(compiled.metadata, "shared", 0)
            usage = f"[{resource_usage(compiled.asm['cubin'])}, {shared} B shared]"
            limit = MAX_SHARED_BYTES.get(self.target.arch)
            if limit is not None and shared > limit:
                # Compiles, but the launch would fail with "out of resource: shared memory".
                self.done[key] = (f"needs {shared} B of shared memory, "
                                  f"sm_{self.target.arch} allows {limit}")
                print(f"FAIL {label} {usage}: {self.done[key]}", flush=True)
            else:
                self.done[key] = None
                print(f"ok   {label} ({time.perf_counter() - start:.1f} s) {usage}", flush=True)
        return None


def resource_usage(cubin: bytes) -> str:
    """Registers and local memory (spills) per thread, from the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    found = re.search(r"REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", out)
    if not found:
        return "resources unknown"
    reg, local = found.groups()
    return f"{reg} regs, {local} B local{' (SPILLS)' if local != '0' else ''}"


def feats(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def exercise(quick: bool) -> None:
    """Call every Triton op with the dtypes and flags the library launches."""
    import snl_kernels  # noqa: F401  (registers the snl_triton ops)

    ops = torch.ops.snl_triton
    dtypes = (torch.float32,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    centres = (8,) if quick else (8, 256)
    for dtype in dtypes:
        # cosine distances
        t, s = feats((2, 40, 5, 7), dtype), feats((2, 40, 5, 7), dtype, 1)
        out = ops.cosine_distances_fwd(t, s)
        g = [torch.randn_like(o) for o in out[:3]]
        for need_teacher in (True, False):
            ops.cosine_distances_bwd(t, s, out[3], out[4], *g, need_teacher)
        # anomaly map, both modes
        teachers = [feats((2, 8, 8, 8), dtype), feats((2, 16, 4, 4), dtype)]
        students = [feats((2, 8, 8, 8), dtype, 1), feats((2, 16, 4, 4), dtype, 2)]
        for mode in ("add", "mul"):
            ops.anomaly_map(teachers, students, [32, 24], 4.0, mode)
        # CRAM, with centres in the embedding's dtype and in fp32
        e = feats((2, 64, 4, 4), dtype)
        for k in centres:
            c = feats((k, 64), dtype if k == 8 else torch.float32, 3)
            tau = torch.tensor(0.5)
            central, assign, compact, dist = ops.cram_fwd(e, c, tau)
            ops.cram_bwd(e, c, tau, assign, dist, torch.randn_like(central),
                         torch.randn_like(assign), torch.randn_like(compact))
        # affinity: Gram and tiled paths, l1 and l2, with and without the teacher's gradient,
        # at each product precision (default: chosen by distance and size)
        for precision in ("",) if quick else ("", "ieee", "tf32", "tf32x3"):
            os.environ["SNL_DOT_PRECISION"] = precision
            affinity(ops, dtype)
        os.environ.pop("SNL_DOT_PRECISION")


def affinity(ops, dtype) -> None:
    grad = torch.tensor(1.0)
    # Small shapes (small blocks) and shapes with the GPU's full blocks: 64-pixel tiles, 256
    # channels per backward program, 256+ pixels (tf32 for l2 by default).
    for shape in ((2, 20, 6, 6), (1, 48, 4, 4), (1, 64, 32, 32), (1, 256, 16, 16)):
        t, s = feats(shape, dtype), feats(shape, dtype, 1)
        for distance in ("l2", "l1"):
            _, signs = ops.intra_affinity_fwd(t, s, distance)
            for need_teacher in (True, False):
                ops.intra_affinity_bwd(t, s, grad, signs, distance, need_teacher)
    for (ca, ha), (cb, hb) in (((12, 8), (20, 4)), ((256, 16), (512, 8))):
        x = [feats((1, ca, ha, ha), dtype), feats((1, cb, hb, hb), dtype, 1),
             feats((1, ca, ha, ha), dtype, 2), feats((1, cb, hb, hb), dtype, 3)]
        for distance in ("l2", "l1"):
            ops.inter_affinity_fwd(*x, distance)
            for need_teacher in (True, False):
                ops.inter_affinity_bwd(*x, grad, distance, need_teacher)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="float32 and K <= 64 only")
    args = parser.parse_args()
    compiler = Compiler(args.arch)
    JITFunction.run = lambda fn, *a, grid, warmup, **kw: compiler.run(fn, *a, grid=grid,
                                                                      warmup=warmup, **kw)
    start = time.perf_counter()
    exercise(args.quick)
    failed = [k for k, v in compiler.done.items() if v is not None]
    print(f"{len(compiler.done)} specialisations compiled for sm_{args.arch} in "
          f"{time.perf_counter() - start:.0f} s, {len(failed)} failed "
          f"(triton {triton.__version__})")
    return 1 if failed or not compiler.done else 0


if __name__ == "__main__":
    sys.exit(main())
