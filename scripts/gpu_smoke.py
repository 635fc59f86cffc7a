"""Smoke step of the GPU round: every op x every backend once, checked and timed.

    python scripts/gpu_smoke.py --out smoke.json [--ops OP ...] [--backends B ...]

For each op (forward and backward where the op has one) and each backend ("torch", the
plain-PyTorch reference; "triton"; "cuda"; and, when asked for, "compile": the reference
under ``torch.compile``), the script runs the op once to compile and check it, compares its
outputs and input gradients with the reference's on the same inputs, then times it: on a
GPU with CUDA events (median of ``--repeats`` runs), on a CPU with the wall clock. One JSON
record per op x backend: whether it ran (or why it could not, or the error it raised), its
error against the reference in float64 on the same values (outputs: the largest difference
relative to the reference's largest magnitude; input gradients: norm-wise, as the tests
measure them), the median time, the rate
(GB/s on the ideal bytes for the memory-bound ops, TFLOP/s on the nominal products for the
others), the H200 target and the speed-up over the reference.

Shapes: on a GPU the benchmark shapes of BENCHMARKS.md (B=16, the WRN50 levels at 256x256,
CRAM D=2048 at 8x8 with K=64); on a CPU small ones, with Triton under its interpreter and
the CUDA backend skipped with the reason, so the script is tested before a GPU sees it.

The JSON file is rewritten after every record, and SIGINT or SIGTERM (the GPU round's time
limit) ends the run with the records so far plus one "interrupted" record per op x backend
not reached, so a cut-off run still reports what it did. ``--append`` adds to an existing
file (the round's last step adds the ``compile`` records that way). ``--warm-jobs N`` first
runs the ops in N parallel processes without timing, which fills Triton's and the extension's
compile caches so that the timed pass does not wait for compilers one kernel at a time.

Exit code: 0 when every backend that could run ran within ``--tol`` of the reference, else 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Triton decides when its kernels are defined whether to interpret them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import snl_kernels  # noqa: E402  (after TRITON_INTERPRET)
from snl_kernels import dispatch, reference  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
BACKENDS = ("torch", "triton", "cuda", "compile")
# (C, H, W) per level: the WRN50 levels at 256x256 on a GPU, small ones on a CPU.
LEVELS = ((256, 64, 64), (512, 32, 32), (1024, 16, 16)) if HAS_GPU else (
    (8, 4, 4), (16, 2, 2), (32, 2, 2))
BATCH = 16 if HAS_GPU else 2
CRAM = {"D": 2048, "h": 8, "w": 8, "K": 64} if HAS_GPU else {"D": 32, "h": 2, "w": 2, "K": 8}
MAP_SIZE = 256 if HAS_GPU else 16

# H200 targets (BENCHMARKS.md): milliseconds at the GPU shapes; CRAM's is relative.
TARGET_MS = {
    "cosine_distances": 0.2,
    "intra_affinity_loss/l2": 0.5,
    "intra_affinity_loss/l1": 3.0,
    "inter_affinity_loss/l2": 0.3,
    "inter_affinity_loss/l1": 0.3,
    "anomaly_map": 0.1,
    # every SNL distillation term, three levels, forward and backward (l2)
    "snl_distillation_loss": 1.5,
}
TARGET_TEXT = {"cram": ">= 3x torch.compile"}
# torch.compile of the reference, measured on an H200 at the GPU shapes (anchors in
# BENCHMARKS.md): used for the ratio to compile when the round has no time to measure it.
COMPILE_ANCHOR_MS = {
    "cosine_distances": 1.95,
    "intra_affinity_loss/l1": 14.5,
    "inter_affinity_loss/l2": 1.60,
    "anomaly_map": 0.46,
}


@dataclass
class Case:
    """One op at the smoke shapes: ``make`` builds fresh inputs, ``run(backend, inputs)``
    returns the outputs (a tuple of tensors) of the forward and, when ``grads`` names inputs,
    their gradients after a backward of the sum of the outputs' means."""

    name: str
    module: str  # snl_kernels module whose IMPLEMENTED/OP name the kernel backends
    make: Callable[[], dict]
    forward: Callable[[str, dict], tuple]
    grads: tuple[str, ...]
    nbytes: Callable[[dict], int] | None = None  # ideal bytes (memory-bound ops)
    flops: Callable[[dict], float] | None = None  # nominal products (compute-bound ops)


def _levels(requires_grad: bool) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    teachers, students = [], []
    for c, h, w in LEVELS:
        t = torch.randn((BATCH, c, h, w), generator=g, device=DEVICE)
        s = t + 0.5 * torch.randn(t.shape, generator=g, device=DEVICE)
        teachers.append(t)
        students.append(s.requires_grad_(requires_grad))
    return {"teachers": teachers, "students": students}


def _kernel_or_reference(backend: str, public: Callable, ref: Callable) -> Callable:
    if backend == "torch":
        return ref
    if backend == "compile":
        return _compiled(ref)
    return lambda *a, **k: public(*a, backend=backend, **k)


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        # Static shapes: the levels' different sizes would otherwise recompile with dynamic
        # shapes, which Inductor cannot lower for adaptive_avg_pool2d (torch 2.11).
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _cosine(backend: str, x: dict) -> tuple:
    op = _kernel_or_reference(backend, snl_kernels.spatial_channel_loss,
                              reference.spatial_channel_loss)
    return tuple(op(x["teachers"], x["students"]))


def _intra(distance: str) -> Callable:
    def forward(backend: str, x: dict) -> tuple:
        op = _kernel_or_reference(backend, snl_kernels.intra_affinity_loss,
                                  reference.intra_affinity_loss)
        return tuple(op(t, s, distance) for t, s in zip(x["teachers"], x["students"],
                                                        strict=True))
    return forward


def _inter(distance: str) -> Callable:
    def forward(backend: str, x: dict) -> tuple:
        op = _kernel_or_reference(backend, snl_kernels.inter_affinity_loss,
                                  reference.inter_affinity_loss)
        t, s = x["teachers"], x["students"]
        return tuple(op(t[k], t[k + 1], s[k], s[k + 1], distance) for k in range(len(t) - 1))
    return forward


def _distillation(backend: str, x: dict) -> tuple:
    """Every distillation term (snl_distillation_loss): the shared path for a kernel
    backend, the separate reference ops for "torch"."""
    from snl_kernels import distillation

    if backend == "torch":
        terms = distillation._separate(x["teachers"], x["students"], distillation.TERMS,
                                       "l2", "l2", "torch")
    else:
        terms = snl_kernels.snl_distillation_loss(x["teachers"], x["students"],
                                                  backend=backend)
    return tuple(terms.values())


def _cram_inputs() -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    d, h, w, k = CRAM["D"], CRAM["h"], CRAM["w"], CRAM["K"]
    return {
        "embedding": torch.randn((BATCH, d, h, w), generator=g, device=DEVICE,
                                 requires_grad=True),
        "centers": torch.randn((k, d), generator=g, device=DEVICE, requires_grad=True),
        "log_tau": torch.tensor(0.5 * math.log(d), device=DEVICE, requires_grad=True),
    }


def _cram(backend: str, x: dict) -> tuple:
    op = _kernel_or_reference(backend, snl_kernels.cram, reference.cram)
    return tuple(op(x["embedding"], x["centers"], x["log_tau"]))


def _anomaly_map(backend: str, x: dict) -> tuple:
    op = _kernel_or_reference(backend, snl_kernels.anomaly_map, reference.anomaly_map)
    with torch.no_grad():
        return tuple(op(x["teachers"], x["students"], MAP_SIZE, 4.0, "add"))


def _feature_bytes(x: dict, backward: bool) -> int:
    n = sum(t.numel() * t.element_size() for t in (*x["teachers"], *x["students"]))
    return n + (sum(s.numel() * 4 for s in x["students"]) if backward else 0)


def _intra_flops(x: dict) -> float:
    # Reference products, forward and backward: the teacher's and the student's N x N
    # affinities (2 N^2 C each) and the student's gradient (2 N^2 C).
    return sum(6.0 * t.shape[0] * (t.shape[2] * t.shape[3]) ** 2 * t.shape[1]
               for t in x["teachers"])


def _inter_flops(x: dict) -> float:
    # C_a x C_b cosines of the teacher and the student (2 C_a C_b N_b each), and the
    # student's two gradient products (4 C_a C_b N_b).
    t = x["teachers"]
    return sum(8.0 * t[k].shape[0] * t[k].shape[1] * t[k + 1].shape[1]
               * t[k + 1].shape[2] * t[k + 1].shape[3] for k in range(len(t) - 1))


def _cram_flops(x: dict) -> float:
    # Distances and central part (2 P K D each) forward; twice that backward.
    e, c = x["embedding"], x["centers"]
    return 12.0 * e.shape[0] * e.shape[2] * e.shape[3] * c.shape[0] * c.shape[1]


CASES = [
    Case("cosine_distances", "cosine_distances", lambda: _levels(True), _cosine, ("students",),
         nbytes=lambda x: _feature_bytes(x, True)),
    *[Case(f"intra_affinity_loss/{d}", "intra_affinity_loss", lambda: _levels(True),
           _intra(d), ("students",), flops=_intra_flops) for d in ("l2", "l1")],
    *[Case(f"inter_affinity_loss/{d}", "inter_affinity_loss", lambda: _levels(True),
           _inter(d), ("students",), flops=_inter_flops) for d in ("l2", "l1")],
    Case("snl_distillation_loss", "distillation", lambda: _levels(True), _distillation,
         ("students",), flops=lambda x: _intra_flops(x) + _inter_flops(x)),
    Case("cram", "cram", _cram_inputs, _cram, ("embedding", "centers", "log_tau"),
         flops=_cram_flops),
    Case("anomaly_map", "anomaly_map", lambda: _levels(False), _anomaly_map, (),
         nbytes=lambda x: _feature_bytes(x, False) + 4 * BATCH * (MAP_SIZE ** 2 + 1)),
]


def _tensors(x: dict, names: tuple[str, ...]) -> list[torch.Tensor]:
    out = []
    for name in names:
        value = x[name]
        out.extend(value if isinstance(value, list) else [value])
    return out


def _step(case: Case, backend: str, x: dict,
          collect: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward (and backward) once; with ``collect``, the outputs and the gradients (each
    step sets .grad to None first, so earlier gradients are never overwritten in place).
    The timed steps do not collect: no work beyond the op and its backward."""
    params = _tensors(x, case.grads)
    for p in params:
        p.grad = None
    outs = [o for o in case.forward(backend, x) if isinstance(o, torch.Tensor)]
    if params:
        sum(o.float().mean() for o in outs).backward()
    if not collect:
        return [], []
    grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
    return [o.detach() for o in outs], grads


def _max_rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest |got - want| over each tensor, relative to that tensor's largest |want|."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return math.inf
        scale = b.double().abs().max().item() or 1.0
        worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    return worst


def _norm_rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest ||got - want|| / ||want|| over the tensors (the tests' measure for gradients).

    Elementwise, an l1 gradient cannot be held to any tolerance: it holds the sign of each
    difference, which flips where a difference is within rounding of zero."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return math.inf
        scale = b.double().norm().item() or 1.0
        worst = max(worst, (a.double() - b.double()).norm().item() / scale)
    return worst


def _float64(x):
    """``x`` (a dict, list or tensor of inputs) with every floating tensor in float64, leaves
    that required grad still requiring it."""
    if isinstance(x, dict):
        return {k: _float64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float64(v) for v in x)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def _sync() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if HAS_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def unavailable(case: Case, backend: str) -> str | None:
    """Why ``backend`` cannot run ``case`` here, or None."""
    if backend in ("torch", "compile"):
        return None
    module = __import__(f"snl_kernels.{case.module}", fromlist=["OP"])
    probe = [torch.empty(1, device=DEVICE)]
    why = dispatch.unavailable_reasons(backend, module.OP, probe, module.IMPLEMENTED)
    return "; ".join(why) or None


def run_case(case: Case, backend: str, repeats: int, tol: float,
             expected: dict[str, tuple]) -> dict:
    record: dict = {"op": case.name, "backend": backend, "device": DEVICE,
                    "shapes": _shape_text(case), "target_ms": TARGET_MS.get(case.name),
                    "target": TARGET_TEXT.get(case.name)}
    why = unavailable(case, backend)
    if why:
        return {**record, "ran": False, "skipped": why}
    start = time.perf_counter()
    try:
        x = case.make()
        if case.name not in expected:  # the reference in float64 on the same values
            expected[case.name] = _step(case, "torch", _float64(x))
        outs, grads = _step(case, backend, x)  # compiles, and is what is checked
        _sync()
        record["first_call_s"] = round(time.perf_counter() - start, 2)
        want_outs, want_grads = expected[case.name]
        record["max_err_out"] = _max_rel_error(outs, want_outs)
        record["max_err_grad"] = _norm_rel_error(grads, want_grads) if grads else None
        err = max(record["max_err_out"], record["max_err_grad"] or 0.0)
        record["max_err"] = err
        record["within_tol"] = bool(err <= tol)
        times = _time_ms(lambda: _step(case, backend, x, collect=False), repeats)
    except Exception as exc:  # the round reports every failure and goes on
        _sync_quietly()
        return {**record, "ran": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc(limit=6)[-4000:]}
    ms = statistics.median(times)
    record.update(ran=True, ms=round(ms, 4), ms_all=[round(t, 4) for t in times])
    if case.nbytes is not None:
        record["gbps"] = _sig(case.nbytes(x) / ms / 1e6)
    if case.flops is not None:
        record["tflops"] = _sig(case.flops(x) / ms / 1e9)
    return record


def _sig(value: float) -> float:
    return float(f"{value:.3g}")


def _sync_quietly() -> None:
    try:
        _sync()
    except Exception:  # a failed kernel may leave the context broken; the record says why
        pass


def _shape_text(case: Case) -> str:
    if case.name == "cram":
        return f"B={BATCH} D={CRAM['D']} {CRAM['h']}x{CRAM['w']} K={CRAM['K']}"
    levels = " ".join(f"{c}x{h}x{w}" for c, h, w in LEVELS)
    return f"B={BATCH} {levels}" + (f" -> {MAP_SIZE}" if case.name == "anomaly_map" else "")


def add_ratios(records: list[dict]) -> None:
    """Speed-up of each record over the reference and over torch.compile of it."""
    by = {(r["op"], r["backend"]): r for r in records if r.get("ran")}
    for r in records:
        if not r.get("ran"):
            continue
        eager = by.get((r["op"], "torch"))
        if eager:
            r["x_eager"] = _sig(eager["ms"] / r["ms"])
        compiled = by.get((r["op"], "compile"))
        if compiled:
            r["x_compile"] = _sig(compiled["ms"] / r["ms"])
            r["compile_ms_from"] = "measured"
        elif HAS_GPU and r["op"] in COMPILE_ANCHOR_MS:
            r["x_compile"] = _sig(COMPILE_ANCHOR_MS[r["op"]] / r["ms"])
            r["compile_ms_from"] = "anchor"


def write(path: str, records: list[dict]) -> None:
    add_ratios(records)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"device": _device_name(), "torch": torch.__version__,
                   "records": records}, f, indent=1)
    os.replace(tmp, path)


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if HAS_GPU else "cpu"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def warm(cases: list[Case], backends: list[str], jobs: int) -> None:
    """Run every op x backend once in parallel processes, untimed, to fill compile caches."""
    todo = [(c.name, b) for c in cases for b in backends
            if b in ("triton", "cuda") and not unavailable(c, b)]
    procs: list[subprocess.Popen] = []
    for name, backend in todo:
        while len([p for p in procs if p.poll() is None]) >= jobs:
            time.sleep(0.05)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--warm-only", "--ops", name, "--backends", backend],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file to write (rewritten after every record)")
    parser.add_argument("--ops", nargs="+", choices=[c.name for c in CASES],
                        help="ops to run, in this order (default: all)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        default=["torch", "triton", "cuda"],
                        help="backends to run (default: torch triton cuda)")
    parser.add_argument("--repeats", type=int, default=5 if HAS_GPU else 1,
                        help="timed runs per record (median)")
    parser.add_argument("--tol", type=float, default=2e-3,
                        help="largest relative error against the reference that passes")
    parser.add_argument("--append", action="store_true", help="add to the records in --out")
    parser.add_argument("--warm-jobs", type=int, default=0,
                        help="first run the kernel backends untimed in N processes")
    parser.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not args.out and not args.warm_only:
        parser.error("--out is required")
    named = {c.name: c for c in CASES}
    cases = [named[name] for name in dict.fromkeys(args.ops)] if args.ops else CASES

    if args.warm_only:
        for case in cases:
            for backend in args.backends:
                _step(case, backend, case.make(), collect=False)
        _sync()
        return 0

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    records: list[dict] = []
    if args.append and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            records = json.load(f)["records"]
    print(f"smoke: {_device_name()}, torch {torch.__version__}, {len(cases)} ops x "
          f"{', '.join(args.backends)}", flush=True)
    todo = [(c, b) for c in cases for b in args.backends]
    try:
        if args.warm_jobs > 0:
            t0 = time.perf_counter()
            warm(cases, args.backends, args.warm_jobs)
            print(f"warm-up in {args.warm_jobs} processes: {time.perf_counter() - t0:.1f} s",
                  flush=True)
        expected: dict[str, tuple] = {}
        while todo:
            case, backend = todo[0]
            record = run_case(case, backend, args.repeats, args.tol, expected)
            todo.pop(0)
            records.append(record)
            write(args.out, records)
            print(_line(record), flush=True)
    except KeyboardInterrupt as exc:
        print(f"smoke: interrupted ({exc}); {len(todo)} op x backend not run", flush=True)
        records += [{"op": c.name, "backend": b, "ran": False, "interrupted": True,
                     "error": f"interrupted ({exc}) " + ("while this ran" if i == 0
                                                         else "before this ran")}
                    for i, (c, b) in enumerate(todo)]
        write(args.out, records)
        return 1
    bad = [r for r in records if ("error" in r) or r.get("within_tol") is False]
    return 1 if bad else 0


def _line(r: dict) -> str:
    head = f"{r['op']:24s} {r['backend']:8s}"
    if r.get("skipped"):
        return f"{head} skipped: {r['skipped']}"
    if not r.get("ran"):
        return f"{head} FAILED: {r.get('error')}"
    rate = f"{r['gbps']} GB/s" if "gbps" in r else f"{r.get('tflops')} TFLOP/s"
    ok = "ok" if r["within_tol"] else "OFF"
    return f"{head} {ok} err {r['max_err']:.2e}  {r['ms']:.4f} ms  {rate}"


if __name__ == "__main__":
    sys.exit(main())
