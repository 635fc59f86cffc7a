"""Profile step of the GPU round: where the time of the fused training loss goes.

    python scripts/gpu_profile.py --out profile.md [--steps 3] [--cases ID ...] [--no-graph]

Each case is one forward and backward step of the smoke's cases at its shapes (the WRN50
levels, B=16, and CRAM at D=2048, on a GPU): ``snl_distillation_loss`` on its shared Triton
path (l2 and l1, every term), and the separate Triton and CUDA affinity, cosine and CRAM
ops, whose H200 times were far from their targets.
For each case, after two warm-up steps:

- GPU ms: CUDA events around the step (median of ``--steps``);
- host ms: the time for the step to return without a synchronisation, i.e. to enqueue its
  work; a host time close to the GPU time means the step is bound by the host;
- kernels: GPU kernel launches per step, and the kernels taking the most GPU time
  (``torch.profiler``), so that the next change is aimed at the largest share.

Then the shared l2 loss's forward and backward is captured in a CUDA graph and replayed
(issue #16: the loss must be capturable): captured or the error, and the replay's GPU ms.

On a CPU the cases run at small shapes under Triton's interpreter, with the reference's and
interpreter's CPU time in place of kernels, and the graph capture is skipped with the
reason, so that the script is tested before a GPU sees it. The markdown goes to ``--out``
(rewritten after every case, so a run cut off by its time limit keeps what it did) and to
stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_smoke as smoke  # sets TRITON_INTERPRET on a CPU before snl_kernels is imported
import torch

import snl_kernels

HAS_GPU = smoke.HAS_GPU
TOP = 12


def _smoke_step(op: str, backend: str) -> Callable[[], Callable[[], object]]:
    """A factory of one step of the smoke's case ``op`` on ``backend`` (fresh inputs)."""
    def make() -> Callable[[], object]:
        case = next(c for c in smoke.CASES if c.name == op)
        x = case.make()
        return lambda: smoke._step(case, backend, x, collect=False)
    return make


def _fused(distance: str) -> Callable[[], Callable[[], object]]:
    """A factory of one step of every distillation term with ``distance`` affinities, on the
    shared Triton path (fresh inputs)."""
    def make() -> Callable[[], object]:
        x = smoke._levels(True)

        def step() -> object:
            terms = snl_kernels.snl_distillation_loss(x["teachers"], x["students"],
                                                      intra_distance=distance,
                                                      inter_distance=distance, backend="triton")
            return torch.autograd.grad(sum(terms.values()), x["students"])
        return step
    return make


# id -> (what the report calls it, a factory of the step)
CASES: dict[str, tuple[str, Callable[[], Callable[[], object]]]] = {
    "loss-l2": ("snl_distillation_loss l2 (shared triton)",
                _smoke_step("snl_distillation_loss", "triton")),
    "loss-l1": ("snl_distillation_loss l1 (shared triton)", _fused("l1")),
    "intra-l2-triton": ("intra_affinity_loss l2 triton",
                        _smoke_step("intra_affinity_loss/l2", "triton")),
    "intra-l1-triton": ("intra_affinity_loss l1 triton",
                        _smoke_step("intra_affinity_loss/l1", "triton")),
    "intra-l1-cuda": ("intra_affinity_loss l1 cuda", _smoke_step("intra_affinity_loss/l1", "cuda")),
    "inter-l2-triton": ("inter_affinity_loss l2 triton",
                        _smoke_step("inter_affinity_loss/l2", "triton")),
    "inter-l2-cuda": ("inter_affinity_loss l2 cuda", _smoke_step("inter_affinity_loss/l2", "cuda")),
    "cosine-triton": ("cosine_distances triton", _smoke_step("cosine_distances", "triton")),
    "cosine-cuda": ("cosine_distances cuda", _smoke_step("cosine_distances", "cuda")),
    "cram-triton": ("cram triton", _smoke_step("cram", "triton")),
    "cram-cuda": ("cram cuda", _smoke_step("cram", "cuda")),
}


#: The performance model's (op, backend) for each case: its predicted time per kernel goes
#: beside the measured one.
MODEL_OPS = {"loss-l2": ("distillation_l2", "triton"), "loss-l1": ("distillation_l1", "triton"),
             "intra-l2-triton": ("intra_affinity_l2", "triton"),
             "intra-l1-triton": ("intra_affinity_l1", "triton"),
             "intra-l1-cuda": ("intra_affinity_l1", "cuda"),
             "inter-l2-triton": ("inter_affinity_l2", "triton"),
             "inter-l2-cuda": ("inter_affinity_l2", "cuda"),
             "cosine-triton": ("cosine_distances", "triton"),
             "cosine-cuda": ("cosine_distances", "cuda"), "cram-triton": ("cram", "triton"),
             "cram-cuda": ("cram", "cuda")}
MODEL_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "perf_model.json"


def kernel_key(name: str) -> str:
    """A profiler's kernel name as the model names it: a CUDA kernel's demangled name without
    return type and parameters; Triton's as it is."""
    from snl_kernels.perf.cuda_sass import kernel_name

    return kernel_name(name)


def predicted_by_kernel(table: Path = MODEL_TABLE) -> dict[tuple, dict[str, float]]:
    """{(model op, backend): {kernel: predicted device ms per step}} from the committed table
    (empty when it cannot be read)."""
    import json

    try:
        from snl_kernels.perf import __main__ as perf

        with open(table) as f:
            records = perf.records(json.load(f))
    except Exception:  # the profile must not fail for want of the model's table
        return {}
    out: dict[tuple, dict[str, float]] = {}
    for record in records:
        per_kernel = out.setdefault((record["op"], record["backend"]), defaultdict(float))
        for launch in record.get("detail", []):
            if launch["kind"] in ("triton", "cuda"):
                per_kernel[launch["kernel"]] += launch["device_us"] / 1e3
    return out


def _sync() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


def _gpu_ms(fn: Callable[[], object]) -> float | None:
    if not HAS_GPU:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _host_ms(fn: Callable[[], object]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - t0) * 1e3
    _sync()
    return elapsed


def _kernels(fn: Callable[[], object], steps: int) -> tuple[float, list[tuple[str, float, float]]]:
    """Kernel launches per step, and (name, calls per step, ms per step) by GPU time; on a
    CPU, the CPU operators by self time instead (calls, ms)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if HAS_GPU:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync()
    calls: dict[str, int] = defaultdict(int)
    total_us: dict[str, float] = defaultdict(float)
    if HAS_GPU:
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                calls[event.name] += 1
                total_us[event.name] += event.time_range.elapsed_us()
        launches = sum(calls.values()) / steps
    else:
        for avg in prof.key_averages():
            calls[avg.key] = avg.count
            total_us[avg.key] = avg.self_cpu_time_total
        launches = float("nan")
    rows = sorted(((name, calls[name] / steps, total_us[name] / 1e3 / steps) for name in calls),
                  key=lambda r: -r[2])
    return launches, rows


def profile_case(case: str, steps: int) -> tuple[list[object], list[tuple[str, float, float]]]:
    name, make = CASES[case]
    fn = make()
    for _ in range(2):  # compile and warm the allocator
        fn()
    _sync()
    gpu = [_gpu_ms(fn) for _ in range(steps)]
    host = [_host_ms(fn) for _ in range(steps)]
    launches, top = _kernels(fn, steps)
    gpu_ms = statistics.median(gpu) if HAS_GPU else None
    return [name, gpu_ms, statistics.median(host), launches], top


def graph_capture(steps: int) -> list[object]:
    """Capture the shared l2 loss's forward and backward in a CUDA graph and replay it."""
    name = CASES["loss-l2"][0] + ", forward and backward in one graph"
    if not HAS_GPU:
        return [name, "skipped: no CUDA GPU", None]
    step = _fused("l2")()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        replay = statistics.median(_gpu_ms(graph.replay) for _ in range(max(steps, 5)))
    except Exception as exc:  # the round reports the failure and goes on
        torch.cuda.synchronize()
        detail = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return [name, f"failed: {type(exc).__name__}: {exc}"[:300] + f" ({detail[:200]})", None]
    return [name, "captured", replay]


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]]


def render(summary: list[list[object]], tops: dict[str, list], graph: list[object] | None,
           steps: int, predicted: dict[str, dict[str, float]] | None = None) -> str:
    device = torch.cuda.get_device_name(0) if HAS_GPU else "CPU (Triton interpreted)"
    lines = [f"## Profile: one forward and backward step ({device}, median of {steps})", ""]
    lines += _table(["case", "GPU ms", "host ms (enqueue)", "kernels per step"], summary)
    lines.append("")
    if graph is not None:
        lines += _table(["CUDA graph", "capture", "replay GPU ms"], [graph])
        lines.append("")
    what = "kernels by GPU time" if HAS_GPU else "CPU operators by self time"
    for name, rows in tops.items():
        total = sum(r[2] for r in rows) or 1.0
        model = (predicted or {}).get(name, {})
        lines += [f"{name}: {what}", ""]
        lines += _table(["name", "calls per step", "ms per step", "share", "predicted ms"],
                        [[n[:80], c, ms, f"{100 * ms / total:.0f}%",
                          model.get(n, model.get(kernel_key(n)))]
                         for n, c, ms in rows[:TOP]])
        lines.append("")
    if predicted:
        lines += ["predicted ms: the performance model's device time of that kernel per step "
                  "(benchmarks/perf_model.json, an H200's rates), where the case is one of its "
                  "ops.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per case")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                        help="which cases (default: all)")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA graph capture")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    out = Path(args.out)
    model = predicted_by_kernel()
    predicted = {CASES[case][0]: model[op] for case, op in MODEL_OPS.items() if op in model}
    summary: list[list[object]] = []
    tops: dict[str, list] = {}
    graph = None
    failed = 0
    for case in args.cases:
        name = CASES[case][0]
        try:
            row, top = profile_case(case, args.steps)
        except snl_kernels.BackendUnavailableError as exc:  # e.g. no CUDA extension here
            row, top = [name, None, None, f"skipped: {exc}"[:300]], []
        except Exception as exc:  # one failing case must not cost the others
            _sync_quietly()
            failed += 1
            row, top = [name, None, None, f"failed: {type(exc).__name__}: {exc}"[:300]], []
        summary.append(row)
        if top:
            tops[name] = top
        out.write_text(render(summary, tops, graph, args.steps, predicted))
        print(f"profile: {name} done", flush=True)
    if not args.no_graph:
        graph = graph_capture(args.steps)
        failed += str(graph[1]).startswith("failed")
    text = render(summary, tops, graph, args.steps, predicted)
    out.write_text(text)
    print(text)
    return 1 if failed else 0


def _sync_quietly() -> None:
    try:
        _sync()
    except Exception:  # a failed kernel may leave the context broken
        pass


if __name__ == "__main__":
    sys.exit(main())
