"""The CUDA backend's counts: its kernels run in the CPU emulation, at the benchmark shapes.

Each op's launches are those of the extension (tests/cuda_emulation's drivers: the affinity
launch sequences are the extension's own, csrc/affinity_launch.cuh; the others repeat the .cu
files' launches), run by a counting build of the drivers (tests/cuda_emulation/count.cpp:
every load and store of a kernel recorded by address, per launch). Needs a source checkout
and g++; no GPU, no CUDA toolkit.

What is counted, per launch:

- bytes requested and distinct, read and written, in the extension's buffers (its inputs,
  outputs and intermediate tensors), not in shared memory or registers;
- tensor-core FLOPs: 2 M N K per WMMA ``mma_sync`` of a warp;
- FMA FLOPs of the kernels whose products run on the CUDA cores, from the launch's problem
  sizes (:func:`fma_flops`: the tiled Delta kernels, the inter-affinity products, the anomaly
  map's combine); elementwise work (norms, the cosine sums) is not counted: those kernels are
  bound by their bytes many times over.

Sampling: a launch of at least twice ``BLOCKS`` blocks runs ``BLOCKS`` of them, spread over
the grid by a golden-ratio sequence (tests/cuda_emulation/include/cuda_emulation.h);
requested bytes and FLOPs scale by blocks / run, and each buffer's distinct bytes by the same
factor up to the buffer's size (right for the two patterns these kernels have: blocks that
each own a slice, and blocks that all read the same operands). Where blocks differ (the tile
grids whose lower triangle returns at once), the scaled figures are estimates:
tests/test_perf_cuda.py compares a sampled count with a full one.

Library and ATen work the emulation cannot run (the intra-affinity Gram path's cuBLAS
products, CRAM's cuBLAS products and small ATen ops, the anomaly map's zero fill) is
listed from the shapes (:func:`aten` calls in ``_gram``, ``_cram`` and ``_anomaly_map``): each
operand read once, each result written once. So are the PyTorch ops around the C++ calls
that the Triton count records as it runs the workloads (:func:`python_ops`): autograd's
backward seed per loss output, and the composition of the cosine terms and of the fused loss
from the separate ops (means, stacks, sums, the means' backward).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import torch

from . import workloads
from .cuda_sass import kernel_name

#: Blocks run per launch in the model's count (all of a smaller grid).
BLOCKS = 32
TILE, BWD_CHANNELS = 64, 128  # csrc/affinity_tiles.cuh: kTile, kBwdChannels
COMBINE_TILE_W = 128  # csrc/anomaly_map_kernels.cuh: kTileW


def _emulation():
    import sys

    root = str(Path(__file__).resolve().parents[2])
    if os.path.isdir(os.path.join(root, "tests", "cuda_emulation")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        from tests.cuda_emulation import run
    except ImportError as err:  # an installed package without the repository's tests/
        raise RuntimeError("the CUDA model needs a source checkout (tests/cuda_emulation) "
                           "and g++") from err
    return run


def _symbols(exe: Path) -> dict[int, str]:
    """Function offsets of a driver -> demangled names without return type or parameters, as
    the sm_90 facts name kernels (``snl::(anonymous namespace)::k<float, 32>``)."""
    out = subprocess.run(["nm", "-C", "--defined-only", str(exe)], capture_output=True,
                         text=True, check=True).stdout
    names = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            names[int(parts[0], 16)] = kernel_name(parts[2])
    return names


def parse(text: str, names: dict[int, str]) -> list[dict]:
    """count.cpp's lines -> launches, scaled from the blocks run to the whole grid."""
    launches = []
    for line in text.splitlines():
        kernel, grid, block, run, rreq, wreq, mma, regions = line.split("\t")
        grid = [int(v) for v in grid.split()]
        blocks, run = math.prod(grid), int(run)
        f = blocks / run
        rd = wd = 0.0
        for region in regions.split():
            size, r, w = (int(v) for v in region.split(":"))
            rd += min(size, r * f)
            wd += min(size, w * f)
        launches.append({
            "kind": "cuda", "kernel": names.get(int(kernel, 16), kernel),
            "grid": grid, "block": [int(v) for v in block.split()], "blocks_run": run,
            "read_requested": int(rreq) * f, "write_requested": int(wreq) * f,
            "read_distinct": rd, "write_distinct": wd, "dot_flops": int(mma) * f,
            "fma_flops": 0.0})
    return launches


_sample = {"blocks": BLOCKS}  # what count_op asked for


def count_records(driver: str, records: list) -> list[dict]:
    """Run ``records`` through the counting build of ``driver``: its launches, in order."""
    run = _emulation()
    blocks = _sample["blocks"]
    exe = run.build(driver, counting=True)
    with tempfile.TemporaryDirectory(prefix="snl-cuda-count-") as work:
        path = os.path.join(work, "counts.tsv")
        saved = {k: os.environ.get(k) for k in ("SNL_EMU_COUNT", "SNL_EMU_BLOCKS")}
        os.environ["SNL_EMU_COUNT"] = path
        os.environ["SNL_EMU_BLOCKS"] = str(blocks or 0)
        try:
            run.run_driver(exe, records)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        text = Path(path).read_text() if os.path.exists(path) else ""
    return parse(text, _symbols(exe))


def _family(kernel: str) -> str:
    return re.sub(r"<.*", "", kernel).rsplit("::", 1)[-1]


def fma_flops(launch: dict, problem: dict) -> float:
    """FLOPs on the CUDA cores of a launch's products (0 for elementwise kernels), from its
    problem sizes: B samples, C channels, N pixels (intra); Ca, Cb, Nb (inter); the map's."""
    family = _family(launch["kernel"])
    on_mma = launch["dot_flops"] > 0
    b = launch["grid"][1]  # the affinity kernels' grids: (tiles, samples of the launch)
    if family == "intra_tiled_fwd_kernel" and not on_mma:
        t = math.ceil(problem["N"] / TILE)  # tiles I <= J, two products of 64 x 64 x C
        return b * t * (t + 1) / 2 * 4 * TILE * TILE * problem["C"]
    if family == "intra_tiled_bwd_kernel" and not on_mma:
        t = math.ceil(problem["N"] / TILE)  # per block (I, channel block), for every J:
        cb = math.ceil(problem["C"] / BWD_CHANNELS)  # Delta again, then dX_S (and dX_T)
        sides = 2 if problem.get("teacher_grad") else 1
        per_j = 4 * TILE * TILE * problem["C"] + sides * 2 * BWD_CHANNELS * TILE * TILE
        return b * t * cb * t * per_j
    if family == "inter_delta_kernel":
        tiles = math.ceil(problem["Ca"] / TILE) * math.ceil(problem["Cb"] / TILE)
        return b * tiles * 4 * TILE * TILE * problem["Nb"]
    if family == "inter_row_grad_kernel":  # (rows, N) = (rows, K) x (K, N): Ca Cb N each
        return b * 2 * problem["Ca"] * problem["Cb"] * problem["Nb"]
    if family == "anomaly_map_combine_kernel":
        maps, levels, hk, wk = problem["m"]
        height, width = problem["size"]
        tiles_w = math.ceil(width / COMBINE_TILE_W)  # mh rows @ m per tile row, then @ mw^T
        return maps * levels * (2 * height * hk * wk * tiles_w + 2 * height * width * wk)
    return 0.0


def aten(name: str, read: float, write: float, flops: float = 0.0, unit: str = "fma") -> dict:
    """A library or ATen call the emulation cannot run, from its shapes. ``unit``: where its
    products run ("fma", or "wgmma" for cuBLAS's tf32 products on Hopper)."""
    return {"kind": "aten", "kernel": name, "grid": None, "block": None, "blocks_run": None,
            "read_requested": read, "write_requested": write, "read_distinct": read,
            "write_distinct": write, "dot_flops": flops, "fma_flops": 0.0, "unit": unit}


# ------------------------------------------------------------------------------- the ops

def _randn(shape, g):
    return torch.randn(shape, generator=g)


def _cosine(shapes, g) -> list[dict]:
    run, out = _emulation(), []
    for c, h, w in shapes.levels:
        b = shapes.batch
        t, s = _randn((b, c, h, w), g), _randn((b, c, h, w), g)
        grads = [_randn(x, g) for x in ((b, h, w), (b, c), (b,))]
        strides, storages = zip(*(run._storage(x) for x in (t, s)), strict=True)
        out += count_records("cosine_distances", [([b, c, h, w, *strides[0], *strides[1], 0],
                                                   [*storages, *grads])])
    return out


def _intra(distance):
    def count(shapes, g) -> list[dict]:
        from .. import precision

        run, out = _emulation(), []
        for c, h, w in shapes.levels:
            n, b = h * w, shapes.batch
            asked = precision.dot_precision(distance == "l1", n)
            product = "intra-l1" if distance == "l1" else "intra-l2"
            if precision.use_grams(c, n, distance):
                with mock.patch.object(precision, "_has_tf32", return_value=True):  # sm_90
                    runs = precision.for_backend("cuda", "intra-l2-gram", asked)
                out += _gram(b, c, n, runs, g)
                continue
            with mock.patch.object(precision, "_has_tf32", return_value=True):  # sm_90
                mma = precision.for_backend("cuda", product, asked) == "tf32"
            case = run.AffinityCase("model", "intra", (b, c, h, w), distance, mma=mma,
                                    teacher_grad=False)
            launches = count_records("affinity", run._affinity_records(
                case, run.affinity_inputs(case), 1.0))
            problem = {"B": b, "C": c, "N": n, "teacher_grad": False}
            out += [dict(x, fma_flops=fma_flops(x, problem)) for x in launches]
        return out
    return count


def _gram(b: int, c: int, n: int, precision: str, g) -> list[dict]:
    """csrc/gram_host.h's calls for one level, forward and backward (student gradient only):
    its kernels (operands, loss sum, coefficients, normalisation backward) counted in the
    emulation, cuBLAS's products from the shapes (each operand read once, each result written
    once)."""
    run = _emulation()
    f, gemm = 4, 2.0  # bytes per float32, FLOPs per multiply-add
    parts = {"ieee": 0, "tf32": 1, "tf32x3": 2}[precision]
    h = 64 if n % 64 == 0 else 1  # any (H, W) with H W = n: the kernels see pixels only
    t, s = _randn((b, c, h, n // h), g), _randn((b, c, h, n // h), g)
    (st_t, t_store), (st_s, s_store) = run._storage(t), run._storage(s)
    gram_in = _randn((b, 2 * c, 2 * c), g)
    operands, loss, coefficients, normalize = (count_records("affinity", [record]) for record in (
        ([4, b, c, h, n // h, parts, 0, b, *st_t, *st_s], [t_store, s_store]),
        ([6, b, c], [gram_in]),
        ([7, b, c, 0, parts, b * n * n], [gram_in, torch.ones(1)]),
        ([5, b, c, h, n // h, *st_s], [s_store, _randn((b, c, n), g)])))
    ed, gr, k, x = 2 * b * c * n * f, 4 * b * c * c * f, 2 * b * c * c * f, b * c * n * f
    products = 3 if parts == 2 else 1
    unit = "wgmma" if parts else "fma"  # cuBLAS's tf32 kernels on Hopper (predicted)
    gram = [aten(f"cuBLAS G = [E; D] [E; D]^T ({precision}, {products} products)",
                 products * 2 * ed, products * gr, products * gemm * b * (2 * c) ** 2 * n, unit)]
    dx = [aten(f"cuBLAS dX_S = K_S [E; D] ({precision}, {products} products)",
               products * (k + ed), products * x, products * gemm * b * c * 2 * c * n, unit)]
    return operands + gram + loss + operands + gram + coefficients + dx + normalize


def _inter(distance):
    def count(shapes, g) -> list[dict]:
        run, out = _emulation(), []
        b = shapes.batch
        for (ca, ha, wa), (cb, hb, wb) in zip(shapes.levels, shapes.levels[1:], strict=False):
            case = run.AffinityCase("model", "inter", ((b, ca, ha, wa), (cb, hb, wb)),
                                    distance, teacher_grad=False)
            launches = count_records("affinity", run._affinity_records(
                case, run.affinity_inputs(case), 1.0))
            problem = {"B": b, "Ca": ca, "Cb": cb, "Nb": hb * wb}
            out += [dict(x, fma_flops=fma_flops(x, problem)) for x in launches]
        return out
    return count


def _cram(shapes, g) -> list[dict]:
    """The row kernels in the emulation; cram_host.h's ATen calls from the shapes."""
    run = _emulation()
    d, h, w, k = shapes.cram
    b, n = shapes.cram_batch, h * w
    p = b * n
    e = _randn((b, d, h, w), g)
    c = _randn((k, d), g)
    ins = [e, c, torch.tensor([0.5 * math.log(d)]), _randn((b, d, h, w), g),
           _randn((b, k, h, w), g), _randn((b, h, w), g)]
    strides, storage = run._storage(e)
    rows = count_records("cram", [([b, d, h, w, k, *strides], [storage, *ins[1:]])])
    if [_family(x["kernel"]) for x in rows] != ["cram_fwd_rows_kernel", "cram_bwd_rows_kernel"]:
        return rows  # an older tree's CRAM, all its own kernels (the model's backtest)
    fwd_rows, bwd_rows = rows
    f = 4  # bytes per float32
    gemm = 2.0  # FLOPs per multiply-add
    ed, kd, pk = p * d * f, k * d * f, p * k * f
    forward = [
        aten("c.square().sum(1)", kd, k * f),
        aten("linalg_vector_norm(e)^2 -> e_sq", ed, p * f),
        aten("bmm_out(dots = e^T c^T)", ed + kd, pk, gemm * p * d * k),
        fwd_rows,
        aten("bmm_out(mu = c^T a)", kd + pk, ed, gemm * p * d * k),
    ]
    backward = [
        aten("bmm_out(g_mu . c)", ed + kd, pk, gemm * p * d * k),
        bwd_rows,
        aten("delta.sum(0, 1) * 2 * c", pk + kd, kd),
        aten("scaled = e * delta_sum", ed + p * f, ed),
        aten("baddbmm_out(dE = 2 scaled - 2 c^T delta)", 2 * ed + kd + pk, ed,
             gemm * p * d * k),
        aten("bmm_out(part = a g_mu^T)", pk + ed, b * kd, gemm * p * d * k),
        aten("part.baddbmm_(delta^T e)", pk + ed + b * kd, b * kd, gemm * p * d * k),
        aten("grad_c.add_(part.sum(0))", b * kd + kd, kd),
        aten("grad_centers.copy_", kd, kd),
        aten("log_tau_terms.sum()", p * f, f),
    ]
    return forward + backward


def _anomaly_map(shapes, g) -> list[dict]:
    """Zero fill, the distance kernel per level, the combine and score kernels."""
    run, out = _emulation(), []
    b, size = shapes.batch, shapes.map_size
    hk = max(h for _, h, _ in shapes.levels)
    wk = max(w for _, _, w in shapes.levels)
    levels = len(shapes.levels)
    out.append(aten("zeros (B, L, hk, wk)", 0, b * levels * hk * wk * 4))
    for c, h, w in shapes.levels:
        t, s = _randn((b, c, h, w), g), _randn((b, c, h, w), g)
        strides, storages = zip(*(run._storage(x) for x in (t, s)), strict=True)
        out += count_records("anomaly_map", [([b, c, h, w, *strides[0], *strides[1]],
                                              list(storages))])
    case = run.CombineCase("model", b, tuple((h, w) for _, h, w in shapes.levels),
                           (size, size), pad_w=0)  # (B, L, hk, wk) as the op pads it
    m, mh, mw = run.combine_inputs(case)
    problem = {"m": tuple(m.shape), "size": (size, size)}
    launches = count_records("anomaly_map_combine",
                             [([b, *m.shape[1:], size, size], [m, mh, mw])])
    return out + [dict(x, fma_flops=fma_flops(x, problem)) for x in launches]


def _distillation(distance):
    """The CUDA backend's fused loss is the separate ops (snl_kernels/distillation.py)."""
    def count(shapes, g) -> list[dict]:
        return (_cosine(shapes, g) + _intra(distance)(shapes, g)
                + _inter(distance)(shapes, g))
    return count


#: Loss outputs per workload: autograd seeds the backward of each with a ones_like.
_OUTPUTS = {"cosine_distances": 3, "intra_affinity_l2": 3, "intra_affinity_l1": 3,
            "inter_affinity_l2": 2, "inter_affinity_l1": 2, "distillation_l2": 5,
            "distillation_l1": 5}
_SEED = "ones_like (autograd's backward seed)"


def python_ops(op: str, shapes: workloads.Shapes = workloads.BENCHMARK) -> list[dict]:
    """The PyTorch ops of ``op``'s workload around the C++ calls on the CUDA backend
    (snl_kernels/cosine_distances.py ``separate_means``, distillation.py ``_separate``), as
    aten entries after the op's launches: their host time and gaps are what the model
    charges them."""
    b = shapes.batch
    out = [aten(_SEED, 0, 0) for _ in range(_OUTPUTS.get(op, 0))]
    if op == "cosine_distances" or op.startswith("distillation"):
        maps = [n * 4 for c, h, w in shapes.levels for n in (b * h * w, b * c, b)]
        out += [aten("mean of a level's distances", n, 0) for n in maps]
        out += [aten("stack of the levels' means", 0, 4 * len(shapes.levels))
                for _ in range(3)]
        out += [aten("sum over the levels", 4 * len(shapes.levels), 0) for _ in range(3)]
        # mean's backward: the upstream gradient expanded and divided by numel.
        out += [aten("mean backward (expand / numel)", 0, n) for n in maps]
    if op.startswith("distillation"):
        pairs = len(shapes.levels) - 1
        out += [aten("stack of the levels' intra losses", 0, 4 * len(shapes.levels)),
                aten("sum over the levels", 4 * len(shapes.levels), 0),
                aten("stack of the pairs' inter losses", 0, 4 * pairs),
                aten("sum over the pairs", 4 * pairs, 0)]
    return out


def compose_distillation(counts: dict, distance: str,
                         shapes: workloads.Shapes = workloads.BENCHMARK) -> dict | None:
    """The fused loss's count from its parts' counts (what _distillation would count again):
    None unless the cosine distances and both affinities of ``distance`` are in ``counts``."""
    parts = ["cosine_distances", f"intra_affinity_{distance}", f"inter_affinity_{distance}"]
    if not all(p in counts for p in parts):
        return None
    # The parts' own Python ops are replaced by the fused loss's (one composition).
    python = {x["kernel"] for x in python_ops(f"distillation_{distance}", shapes)}
    return {"launches": [x for p in parts for x in counts[p]["launches"]
                         if x["kind"] != "aten" or x["kernel"] not in python]
            + python_ops(f"distillation_{distance}", shapes),
            "ideal_bytes": workloads.MAKERS[f"distillation_{distance}"](shapes).ideal_bytes,
            "blocks": counts[parts[0]]["blocks"], "count_seconds": 0.0,
            "composed_of": parts}


COUNTERS = {
    "cosine_distances": _cosine,
    "intra_affinity_l2": _intra("l2"), "intra_affinity_l1": _intra("l1"),
    "inter_affinity_l2": _inter("l2"), "inter_affinity_l1": _inter("l1"),
    "distillation_l2": _distillation("l2"), "distillation_l1": _distillation("l1"),
    "cram": _cram, "anomaly_map": _anomaly_map,
}


def count_op(op: str, shapes: workloads.Shapes = workloads.BENCHMARK,
             blocks: int | None = BLOCKS) -> dict:
    """``{"launches", "ideal_bytes", "blocks", "count_seconds"}`` of ``op`` on the CUDA
    backend at ``shapes`` (the Triton workload's ideal bytes: the same op)."""
    import time

    saved, _sample["blocks"] = _sample["blocks"], blocks
    start = time.perf_counter()
    try:
        launches = COUNTERS[op](shapes, torch.Generator().manual_seed(0))
        launches += python_ops(op, shapes)
    finally:
        _sample["blocks"] = saved
    ideal = workloads.MAKERS[op](shapes).ideal_bytes
    return {"launches": launches, "ideal_bytes": ideal, "blocks": blocks,
            "count_seconds": time.perf_counter() - start}


def dispatcher_us(calls: int = 2000, repeats: int = 5) -> float:
    """Host microseconds of one ``torch.ops`` call through the dispatcher to a C++-registered
    kernel: a stand-in op of the cosine forward's schema whose CPU kernel returns its inputs
    (the CUDA op's own host code, its checks and allocations, is not in it)."""
    import time

    name = "snl_perf_standin"
    if not hasattr(torch.ops, name) or not hasattr(getattr(torch.ops, name), "fwd"):
        lib = torch.library.Library(name, "DEF")
        lib.define("fwd(Tensor teacher, Tensor student) -> (Tensor, Tensor)")
        lib.impl("fwd", lambda t, s: (t, s), "CPU")
        _LIBS.append(lib)
    op = getattr(torch.ops, name).fwd
    t, s = torch.zeros(4), torch.zeros(4)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            op(t, s)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


_LIBS: list = []  # keeps the stand-in registered


#: Files of the emulation the counts do not depend on (its own checks).
NOT_COUNTED = ("selftest.cpp", "count_selftest.cpp", "__main__.py", "__init__.py")


def sources_digest() -> str:
    """A digest of what the CUDA counts depend on: csrc/, the emulation's drivers, headers
    and runner, and this module."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    paths = [*sorted((root / "csrc").glob("*")),
             *sorted((root / "tests" / "cuda_emulation").rglob("*.[ch]*")),
             *sorted((root / "tests" / "cuda_emulation").glob("*.py")), Path(__file__)]
    for path in paths:
        if path.is_file() and path.name not in NOT_COUNTED:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
