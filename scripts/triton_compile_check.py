"""Compile every Triton kernel of snl_kernels for a GPU target, on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels' arithmetic but not Triton's
compiler: layout, shape and type rules of real code generation go unchecked there. This
script lets Triton's own ``JITFunction.run`` handle every launch as it would on a GPU (the
binder specialises the arguments, the backend turns that into compile attributes, the
options are parsed), with two changes: a stand-in driver reports the target GPU (no driver,
no GPU needed), and each launch is a warm-up, so the kernel is compiled to a cubin and not
run. Each Triton op is then called on CPU tensors of every dtype and flag combination the
library uses, so that every specialisation a GPU run of these calls would compile is compiled
here, with the same attributes: integer arguments divisible by 16 and 16-byte aligned
pointers get ``tt.divisibility = 16`` (vector loads, different products), integer arguments
equal to 1 become constants. PyTorch's CPU allocations are 64-byte aligned like a GPU
allocator's (checked at each launch), so a tensor's alignment is the one a GPU launch sees.

    python scripts/triton_compile_check.py [--arch 90] [--quick]

``--quick``: float32 inputs and K <= 64 centres only (the test suite's setting; the full run
also compiles fp16/bf16 and K = 256, a few minutes more on a cold cache).

Prints one line per compiled specialisation (its attributes: ``div16`` arguments, ``=1``
arguments; registers, spills, shared memory) and exits 1 if any failed to compile, needs more
shared memory than a block may have on the target (such a kernel compiles but cannot launch),
or if no specialisation got a divisibility attribute (the attribute path did nothing). The
launch results are garbage (nothing runs).
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
from triton.runtime.driver import driver as triton_driver
from triton.runtime.jit import JITFunction

# Shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# What a GPU allocator guarantees at least (PyTorch's caching allocator: 512 bytes), and what
# Triton's specialisation tests pointers for.
ALIGNMENT = 16
# The JITFunction internals this script relies on, as in Triton 3.6 to 3.9: run() specialises
# a launch with the binder, and compiles through _do_compile when that specialisation is not
# in its cache; the compile target comes from the active driver.
DO_COMPILE_PARAMS = ("self", "key", "signature", "device", "constexprs", "options", "attrs",
                     "warmup")


def check_triton_layout() -> None:
    """Exit with the reason if this Triton's JIT is not laid out as this script expects."""
    problems = []
    run = getattr(JITFunction, "run", None)
    if run is None or "warmup" not in inspect.signature(run).parameters:
        problems.append("JITFunction.run has no warmup argument")
    do_compile = getattr(JITFunction, "_do_compile", None)
    params = tuple(inspect.signature(do_compile).parameters) if do_compile else None
    if params != DO_COMPILE_PARAMS:
        problems.append(f"JITFunction._do_compile takes {params}, expected {DO_COMPILE_PARAMS}")
    if not hasattr(triton_driver, "set_active"):
        problems.append("triton.runtime.driver.driver has no set_active")
    if problems:
        sys.exit(f"unknown Triton layout (triton {triton.__version__}, "
                 f"{os.path.dirname(triton.__file__)}): {'; '.join(problems)}. This script "
                 "knows Triton 3.6 to 3.9; see JITFunction.run in triton/runtime/jit.py.")


class TargetDriver:
    """Stands in for Triton's GPU driver in JITFunction.run: the target GPU, device 0, stream 0.

    Any other request (loading or launching a kernel, device properties) is an error: this
    Triton's JIT needs more of a driver than a warm-up compile did in Triton 3.6 to 3.9.
    """

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def __getattr__(self, name: str):
        raise AttributeError(f"the compile check's stand-in driver has no {name!r}: unknown "
                             f"Triton layout (triton {triton.__version__})")


def tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from tensors(value)


def attribute_names(fn: JITFunction, signature: dict, constexprs: dict, attrs: dict):
    """Arguments given tt.divisibility 16, and non-constexpr arguments made constants (=1)."""
    names = [p.name for p in fn.params]

    def name(path):
        return names[path[0]] + "".join(f"[{i}]" for i in path[1:])

    div16 = [name(path) for path, values in attrs.items()
             if not fn.params[path[0]].is_constexpr
             and any(v[0] == "tt.divisibility" and v[1] % 16 == 0 for v in values)]
    constants = [f"{name(path)}={value!r}" for path, value in constexprs.items()
                 if not fn.params[path[0]].is_constexpr]
    return sorted(div16), sorted(constants)


class Compiler:
    """Compiles each specialisation Triton's JIT asks for, and records how it went."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        # (kernel, the JIT's key: types, attributes, constexprs, options) -> None or the failure
        self.done: dict[tuple, str | None] = {}
        self.with_divisibility = 0  # specialisations with tt.divisibility in their Triton IR
        self.with_constants = 0  # with non-constexpr arguments made constants (=1)

    def install(self) -> None:
        """Route every Triton launch of this process through the JIT's warm-up compile."""
        check_triton_layout()
        triton_driver.set_active(TargetDriver(self.target))
        jit_run, jit_do_compile = JITFunction.run, JITFunction._do_compile
        compiler = self

        def run(fn, *args, grid, warmup, **kwargs):
            for t in tensors(list(args) + list(kwargs.values())):
                base = t.untyped_storage().data_ptr()
                if base % ALIGNMENT:
                    raise RuntimeError(f"{fn.__name__}: a {tuple(t.shape)} tensor argument's "
                                       f"storage is at {base:#x}, not {ALIGNMENT}-byte aligned "
                                       "as a GPU allocation would be")
            return jit_run(fn, *args, grid=grid, warmup=True, **kwargs)

        def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
            return compiler.compile(jit_do_compile, fn, key, signature, device, constexprs,
                                    options, attrs, warmup)

        JITFunction.run = run
        JITFunction._do_compile = do_compile
        # The library launches through its pre-bound launcher, which keeps the compiled
        # kernel's C launcher: here each of its launches is a warm-up compile instead.
        from snl_kernels._triton import launch

        launch.hook = lambda fn, grid, args, options: run(fn, grid=grid, warmup=True, **args,
                                                          **options)

    def compile(self, jit_do_compile, fn, key, signature, device, constexprs, options, attrs,
                warmup):
        done_key = (fn.__name__, key)
        if done_key in self.done:  # failed before (the JIT caches the kernels that compiled)
            return None
        div16, constants = attribute_names(fn, signature, constexprs, attrs)
        self.with_constants += bool(constants)
        consts = {p.name: constexprs[(i,)] for i, p in enumerate(fn.params) if p.is_constexpr}
        dtypes = sorted({v[1:] for v in signature.values()
                         if isinstance(v, str) and v.startswith("*")})
        label = (f"{fn.__name__} {'/'.join(dtypes)} {consts} num_warps={options.num_warps} "
                 f"num_stages={options.num_stages}\n       div16: {','.join(div16) or '-'}; "
                 f"constants: {','.join(constants) or '-'}")
        start = time.perf_counter()
        try:
            kernel = jit_do_compile(fn, key, signature, device, constexprs, options, attrs,
                                    warmup)
        except Exception:
            self.done[done_key] = traceback.format_exc(limit=3)
            print(f"FAIL {label}\n{self.done[done_key]}", flush=True)
            return None
        shared = getattr(kernel.metadata, "shared", 0)
        usage = f"[{resource_usage(kernel.asm['cubin'])}, {shared} B shared]"
        limit = MAX_SHARED_BYTES.get(self.target.arch)
        # The attributes as the compiler got them: the kernel's signature in its Triton IR.
        in_ir = sum(line.count("tt.divisibility = 16") for line in kernel.asm["ttir"].splitlines()
                    if line.lstrip().startswith("tt.func public"))
        self.with_divisibility += in_ir > 0
        if in_ir != len(div16):
            self.done[done_key] = (f"{len(div16)} arguments specialised as divisible by 16, "
                                   f"{in_ir} so marked in the kernel's Triton IR")
            print(f"FAIL {label} {usage}: {self.done[done_key]}", flush=True)
        elif limit is not None and shared > limit:
            # Compiles, but the launch would fail with "out of resource: shared memory".
            self.done[done_key] = (f"needs {shared} B of shared memory, "
                                   f"sm_{self.target.arch} allows {limit}")
            print(f"FAIL {label} {usage}: {self.done[done_key]}", flush=True)
        else:
            self.done[done_key] = None
            print(f"ok   {label} ({time.perf_counter() - start:.1f} s) {usage}", flush=True)
        return kernel


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
    from snl_kernels import precision as plan

    ops = torch.ops.snl_triton
    dtypes = (torch.float32,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    centres = (8,) if quick else (8, 256)
    for dtype in dtypes:
        # Each op at an odd shape and at one whose sizes and strides are multiples of 16, as at
        # the benchmark shapes: Triton specialises a kernel on both (tt.divisibility 16).
        # cosine distances
        for shape in ((2, 40, 5, 7), (2, 64, 8, 8)):
            t, s = feats(shape, dtype), feats(shape, dtype, 1)
            out = ops.cosine_distances_fwd(t, s)
            g = [torch.randn_like(o) for o in out[:3]]
            for need_teacher in (True, False):
                ops.cosine_distances_bwd(t, s, out[3], out[4], *g, need_teacher)
        # anomaly map, both modes
        for shapes, size in ((((2, 8, 8, 8), (2, 16, 4, 4)), [32, 24]),
                             (((2, 32, 16, 16), (2, 64, 8, 8)), [64, 64])):
            teachers = [feats(shape, dtype) for shape in shapes]
            students = [feats(shape, dtype, 1) for shape in shapes]
            for mode in ("add", "mul"):
                ops.anomaly_map(teachers, students, size, 4.0, mode)
        # CRAM, with centres in the embedding's dtype and in fp32
        e = feats((2, 64, 4, 4), dtype)
        for k in centres:
            c = feats((k, 64), dtype if k == 8 else torch.float32, 3)
            tau = torch.tensor(0.5)
            central, assign, compact, dist = ops.cram_fwd(e, c, tau)
            ops.cram_bwd(e, c, tau, assign, dist, torch.randn_like(central),
                         torch.randn_like(assign), torch.randn_like(compact))
        # snl_distillation_loss's shared path: three levels per cosine launch (an odd set and
        # one of multiples of 16), the pooling of four tensors with their norms
        from snl_kernels._triton import affinity as ka
        from snl_kernels._triton import cosine_distances as kc

        for shapes in (((2, 40, 9, 9), (2, 24, 5, 5), (2, 12, 3, 3)),
                       ((2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4))):
            ts = [feats(shape, dtype) for shape in shapes]
            ss = [feats(shape, dtype, 1) for shape in shapes]
            outs = kc.forward_levels(ts, ss, 1e-8)
            ups = [[torch.randn_like(out[i]) for out in outs] for i in range(3)]
            for need_teacher in (True, False):
                kc.backward_levels(ts, ss, [o[3] for o in outs], [o[4] for o in outs], *ups,
                                   need_teacher, 1e-8)
            # The fused loss's variants: the means and both kinds of norms forward, the
            # means' 0-dim gradients backward.
            outs, extra = kc.forward_levels(ts, ss, 1e-8, means=True,
                                            norms=("pixel", "channel"))
            g = [[torch.ones((), device=ts[0].device)] * len(ts)] * 3
            kc.backward_levels(ts, ss, [o[3] for o in outs], [o[4] for o in outs], *g, False,
                               1e-8, sample_stats=extra["sample_stats"], of_means=True)
            sizes = [tuple(shapes[1][2:])] * 2 + [tuple(shapes[2][2:])] * 2
            ka.pool_with_norms([ts[0], ss[0], ts[1], ss[1]], sizes, 1e-8)
            jobs = []
            for x in ss:
                for pix_rows in (True, False):
                    out = None if dtype == torch.float32 else torch.empty_like(x)
                    jobs.append((x, ka.inv_norms(x, pix_rows, 1e-8),
                                 torch.randn(x.shape), pix_rows, out))
            ka.norm_backward_group(jobs, 1e-8)
            gd = torch.randn(shapes[0][0], shapes[0][1], shapes[1][1])
            p0 = ka.pool(ts[0], tuple(shapes[1][2:]))
            ka.scaled_mm_group([(gd, ts[1], ka.inv_norms(ts[1], False, 1e-8), -1.0, "tf32"),
                                (gd.transpose(1, 2), p0, ka.inv_norms(p0, False, 1e-8), -1.0,
                                 "tf32x3")])
            ka.unpool_group([(p0, ts[0]), (p0, ss[0])])
            # Deltas grouped: an intra-affinity level (symmetric, l1 with sign bits), an
            # inter-affinity pair, and its gradient
            r1 = [ka.inv_norms(x, True, 1e-8) for x in (ss[1], ts[1])]
            n1 = shapes[1][2] * shapes[1][3]
            signs = torch.zeros((shapes[1][0], n1, -(-n1 // 32)), dtype=torch.int32)
            q = [ka.inv_norms(x, False, 1e-8) for x in (p0, p0, ss[1], ts[1])]
            inter = dict(a_s=p0, a_t=p0, b_s=ss[1], b_t=ts[1], r_as=q[0], r_at=q[1], r_bs=q[2],
                         r_bt=q[3], pix_rows=False, l1=False, precision="tf32")
            ka.delta_group([
                dict(a_s=ss[1], a_t=ts[1], b_s=ss[1], b_t=ts[1], r_as=r1[0], r_at=r1[1],
                     r_bs=r1[0], r_bt=r1[1], pix_rows=True, l1=True, precision="tf32x3",
                     signs=signs),
                inter, dict(inter, grad=(torch.ones(1), 0.5))])
            # the tiled intra-affinity backward of two levels in one launch (l1 from sign
            # bits with the teacher's gradient, l2 recomputed without)
            r2 = [ka.inv_norms(x, True, 1e-8) for x in (ss[2], ts[2])]
            ka.intra_tiled_grad_group([
                dict(s=ss[1], t=ts[1], r_s=r1[0], r_t=r1[1], grad_loss=torch.ones(1), coef=0.5,
                     l1=True, teacher=True, precision="tf32x3", signs=signs),
                dict(s=ss[2], t=ts[2], r_s=r2[0], r_t=r2[1], grad_loss=torch.ones(1), coef=0.5,
                     l1=False, teacher=False, precision="tf32")])
        # affinity: Gram and tiled paths, l1 and l2, with and without the teacher's gradient,
        # at the precision the library asks for each call (every precision in the full run)
        affinity(ops, dtype, None if quick else plan.PRECISIONS)


def affinity(ops, dtype, precisions) -> None:
    """Both affinity losses' ops; ``precisions``: None for the library's choice per call."""
    from snl_kernels import precision as plan

    grad = torch.tensor(1.0)
    # Small shapes (small blocks) and shapes with the GPU's full blocks: 64-pixel tiles, 256
    # channels per backward program, 256+ pixels (tf32 for l2 by default).
    for shape in ((2, 20, 6, 6), (1, 48, 4, 4), (1, 64, 32, 32), (1, 256, 16, 16)):
        t, s = feats(shape, dtype), feats(shape, dtype, 1)
        for distance in ("l2", "l1"):
            grams, chosen = plan.intra_plan("triton", t, distance)
            for dot in precisions or (chosen,):
                signs = ops.intra_affinity_fwd(t, s, distance, grams, dot)[1]
                # With store: the Grams, or on the tiled path l2's Delta, kept for the
                # backward, which reads them.
                saved = ops.intra_affinity_fwd(t, s, distance, grams, dot, 2)[2]
                for need_teacher in (True, False):
                    ops.intra_affinity_bwd(t, s, grad, signs, distance, grams, dot, need_teacher)
                    ops.intra_affinity_bwd(t, s, grad, signs, distance, grams, dot, need_teacher,
                                           saved)
    for (ca, ha), (cb, hb) in (((12, 8), (20, 4)), ((256, 16), (512, 8))):
        x = [feats((1, ca, ha, ha), dtype), feats((1, cb, hb, hb), dtype, 1),
             feats((1, ca, ha, ha), dtype, 2), feats((1, cb, hb, hb), dtype, 3)]
        for distance in ("l2", "l1"):
            for dot in precisions or (plan.inter_plan("triton", x[0], x[1], distance),):
                ops.inter_affinity_fwd(*x, distance, dot)
                # With store: the Delta kernel also writes the unit gradient, and the
                # backward takes it (and the pooled levels and norms) as they are.
                saved = ops.inter_affinity_fwd(*x, distance, dot, 1)[1]
                for need_teacher in (True, False):
                    ops.inter_affinity_bwd(*x, grad, distance, dot, need_teacher)
                    ops.inter_affinity_bwd(*x, grad, distance, dot, need_teacher, saved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="float32 and K <= 64 only")
    args = parser.parse_args()
    compiler = Compiler(args.arch)
    compiler.install()
    start = time.perf_counter()
    exercise(args.quick)
    failed = [k for k, v in compiler.done.items() if v is not None]
    print(f"{len(compiler.done)} specialisations compiled for sm_{args.arch} in "
          f"{time.perf_counter() - start:.0f} s, {len(failed)} failed "
          f"(triton {triton.__version__}); attributes: {compiler.with_divisibility} with "
          f"divisibility 16, {compiler.with_constants} with arguments made constants")
    if compiler.done and not compiler.with_divisibility:
        print("FAIL no specialisation got a divisibility attribute: the launches' attributes "
              "did not reach the compiler")
    return 1 if failed or not compiler.done or not compiler.with_divisibility else 0

if __name__ == "__main__":
    sys.exit(main())
