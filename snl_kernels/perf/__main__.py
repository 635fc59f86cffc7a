"""Print the performance model: ``python -m snl_kernels.perf [--quick] [--json FILE]``.

Runs the two passes (:mod:`.runner`: bytes and FLOPs under Triton's interpreter, the sm_90
compile with its host times), joins them per launch and prints, per op: launches, bytes
(distinct, requested, ideal), FLOPs by unit, host time, the predicted eager and CUDA-graph
times beside the target and the last GPU measurement; then per launch: programs, warps,
registers, shared memory, blocks per SM, the wave penalty, bytes, FLOPs, the matrix
instructions, the widest load, spills, wgmma groups waited for inside a loop, arguments and
host time. ``--json FILE`` writes one record per op x backend.

``--quick`` counts at reduced shapes (QUICK in :mod:`.workloads`: half the channels and
side of every level, a quarter of CRAM's D, the map to 128 x 128) and predicts for those
shapes: what CI runs, in a few minutes. The full mode counts one sample of the benchmark's
B = 16 launches (scaled by 16) and CRAM at its full batch: about 40 minutes on 2 cores.

``--cuda`` adds the CUDA backend's records: its kernels counted in the CPU emulation at the
benchmark shapes (:mod:`.cuda`), their sm_90 code where nvcc and a CUDA build of PyTorch are
here (:mod:`.cuda_sass`); without it, stored CUDA counts are kept while their sources are
this tree's. Without any, the CUDA records carry the targets and the last measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

from . import model, runner, workloads


def build(ops, mode: str, work_dir: str, host_time: bool = True, log=None) -> dict:
    """Run both passes: ``{"mode", "sources", "raw": {"count", "compile"}}`` for ``ops``."""
    sources = runner.sources_digest()
    counted, compiled = runner.run_passes(ops, mode, work_dir, host_time, log)
    return {"mode": mode, "sources": sources, "raw": {"count": counted, "compile": compiled}}


def records(result: dict) -> list[dict]:
    """The model's records (Triton, then CUDA) from a build's raw passes."""
    counted, compiled = result["raw"]["count"], result["raw"]["compile"]
    ops = [op for op in workloads.OPS if op in counted]
    out = [model.op_record(op, counted[op], compiled[op]) for op in ops]
    for record, op in zip(out, ops, strict=True):
        record["count_seconds"] = counted[op]["count_seconds"]
        record["mode"] = result["mode"]
    cuda = result["raw"].get("cuda") or {}
    facts = result["raw"].get("cuda_sass")
    dispatch = result["raw"].get("cuda_dispatch_us")
    return out + [model.cuda_record(op, cuda.get(op), facts, dispatch) for op in ops]


def cuda_pass(ops, log=None) -> dict:
    """The CUDA backend's counts in the CPU emulation (:mod:`.cuda`), its kernels' sm_90
    facts where nvcc and a CUDA build of PyTorch are here (:mod:`.cuda_sass`), and the
    dispatcher's host time: the raw entries ``cuda``, ``cuda_sass``, ``cuda_dispatch_us``,
    ``cuda_sources``."""
    from . import cuda, cuda_sass

    counts = {}
    for op in ops:
        if op.startswith("distillation_"):
            continue
        counts[op] = cuda.count_op(op)
        if log:
            print(f"  cuda {op}: {counts[op]['count_seconds']:.0f} s", file=log, flush=True)
    for distance in ("l2", "l1"):
        composed = cuda.compose_distillation(counts, distance)
        if f"distillation_{distance}" in ops and composed is not None:
            counts[f"distillation_{distance}"] = composed
    try:
        facts = cuda_sass.kernel_facts()
    except RuntimeError as err:  # no nvcc or no CUDA build of torch here
        facts = None
        if log:
            print(f"  cuda sm_90 facts skipped: {err}", file=log, flush=True)
    return {"cuda": counts, "cuda_sass": facts, "cuda_dispatch_us": cuda.dispatcher_us(),
            "cuda_sources": cuda.sources_digest()}


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


OP_COLUMNS = ("op", "backend", "launches", "distinct MB", "requested MB", "ideal MB",
              "distinct/ideal", "tensor-core GFLOP", "FMA GFLOP", "all on HGMMA", "host us",
              "predicted ms (eager)", "predicted ms (graph)", "target ms",
              "measured ms (commit, card)")


def op_table(records: list[dict]) -> str:
    lines = [_row(OP_COLUMNS), _row(["---"] * len(OP_COLUMNS))]
    for r in records:
        modelled = r["predicted_ms"] is not None
        ratio = r["distinct_bytes"] / r["ideal_bytes"] if modelled else None
        measured = (f"{r['measured_ms']} ({r['measured_commit']}, {r['measured_card']})"
                    if r["measured_ms"] is not None else "-")
        tc = "-" if r["tensor_core"] is None else ("yes" if r["tensor_core"] else "no")
        lines.append(_row([
            r["op"], r["backend"], r["launches"] or "-", _mb(r["distinct_bytes"]),
            _mb(r["requested_bytes"]), _mb(r["ideal_bytes"]), _num(ratio, ".2f"),
            _num(r.get("tensor_core_flops") and r["tensor_core_flops"] / 1e9, ".1f"),
            _num(r.get("fma_flops") and r["fma_flops"] / 1e9, ".2f"), tc,
            _num(r["host_us"], ".0f"), _num(r["predicted_ms"], ".3f"),
            _num(r["predicted_graph_ms"], ".3f"), r["target_ms"], measured]))
    return "\n".join(lines)


LAUNCH_COLUMNS = ("phase", "kernel", "programs", "warps", "regs", "smem KB", "blocks/SM",
                  "wave x", "distinct MB", "requested MB", "TC GFLOP", "FMA GFLOP",
                  "HGMMA/HMMA/FFMA", "load bits", "spills", "waits in loop", "args",
                  "host us", "bound", "device us")


def launch_table(record: dict) -> str:
    lines = [_row(LAUNCH_COLUMNS), _row(["---"] * len(LAUNCH_COLUMNS))]
    for x in record["detail"]:
        c = x["compiled"]
        k = c["kernel_info"] if c else {}
        lines.append(_row([
            x["phase"], x["kernel"], x["programs"] or "-", k.get("num_warps", "-"),
            k.get("registers", "-"),
            _num(c and k["shared_bytes"] / 1024, ".0f"), c["blocks_per_sm"] if c else "-",
            f"{x['wave_factor']:.2f}", _mb(x["read_distinct"] + x["write_distinct"]),
            _mb(x["read_requested"] + x["write_requested"]), f"{x['dot_flops'] / 1e9:.2f}",
            f"{x['fma_flops'] / 1e9:.3f}",
            f"{k['hgmma']}/{k['hmma']}/{k['ffma']}" if c else "-",
            k.get("widest_load_bits", "-"),
            ("yes" if k["local_bytes"] else "no") if c else "-",
            k.get("waits_all_in_loop", "-"), c["args"] if c else x["args"],
            f"{x['host_us']:.1f}", x["bound"], f"{x['device_us']:.1f}"]))
    return "\n".join(lines)


CUDA_COLUMNS = ("kernel", "blocks (run)", "threads", "regs", "smem KB", "blocks/SM",
                "wave x", "distinct MB", "requested MB", "TC GFLOP", "FMA GFLOP", "HGMMA/HMMA/FFMA",
                "load bits", "spills", "host us", "bound", "device us")


def cuda_launch_table(record: dict) -> str:
    lines = [_row(CUDA_COLUMNS), _row(["---"] * len(CUDA_COLUMNS))]
    for x in record["detail"]:
        k = x["facts"] or {}
        name = x["kernel"].replace("(anonymous namespace)::", "")
        blocks = f"{x['programs']} ({x['blocks_run']})" if x["programs"] else "-"
        tc = x["dot_flops"] if x["unit"] != "fma" else 0.0  # library GEMMs: on the FMA pipes
        fma = x["fma_flops"] + x["dot_flops"] - tc
        lines.append(_row([
            name, blocks, math.prod(x["block"]) if x["block"] else "-",
            k.get("registers", "-"), _num(k["shared_bytes"] / 1024 if k else None, ".1f"),
            _num(x["blocks_per_sm"], "d"), f"{x['wave_factor']:.2f}",
            _mb(x["read_distinct"] + x["write_distinct"]),
            _mb(x["read_requested"] + x["write_requested"]), f"{tc / 1e9:.2f}",
            f"{fma / 1e9:.2f}", f"{k['hgmma']}/{k['hmma']}/{k['ffma']}" if k else "-",
            k.get("widest_load_bits", "-"),
            ("yes" if k["local_bytes"] else "no") if k else "-",
            f"{x['host_us']:.1f}", x["bound"], f"{x['device_us']:.1f}"]))
    return "\n".join(lines)


def _cuda_digest() -> str:
    from . import cuda

    return cuda.sources_digest()


def rates_text() -> str:
    return "\n".join(f"- {name} = {value:g}: {model.RATE_SOURCES.get(name, '')}"
                     for name, value in model.RATES.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snl_kernels.perf",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced shapes (CI): predictions are for those shapes")
    parser.add_argument("--ops", nargs="+", default=list(workloads.OPS),
                        choices=workloads.OPS, metavar="OP", help="default: every op")
    parser.add_argument("--json", metavar="FILE", help="write one record per op x backend")
    parser.add_argument("--launches", action="store_true",
                        help="also print every op's launches")
    parser.add_argument("--from", dest="from_file", metavar="FILE",
                        help="recompute the predictions from the counts stored in an "
                             "earlier --json FILE (no passes run)")
    parser.add_argument("--no-host-time", action="store_true",
                        help="skip timing the launches through Triton's launch path")
    parser.add_argument("--cuda", action="store_true",
                        help="also count the CUDA backend in the CPU emulation at the "
                             "benchmark shapes (about 7 minutes; with --from: only that)")
    args = parser.parse_args(argv)
    if args.from_file:
        with open(args.from_file) as f:
            result = json.load(f)
        if result["sources"] != runner.sources_digest():
            parser.error(f"{args.from_file} was counted from other sources than this tree's "
                         f"(digest {result['sources']}, here {runner.sources_digest()}): run "
                         "the passes again")
        start = time.perf_counter()
    else:
        mode = "quick" if args.quick else "full"
        start = time.perf_counter()
        print(f"performance model, {mode} mode: counting {len(args.ops)} ops under the "
              "interpreter and compiling them for sm_90, at once ...", file=sys.stderr,
              flush=True)
        with tempfile.TemporaryDirectory(prefix="snl-perf-") as work:
            result = build(args.ops, mode, work, host_time=not args.no_host_time,
                           log=sys.stderr)
    if args.cuda:
        print("counting the CUDA backend in the CPU emulation ...", file=sys.stderr, flush=True)
        result["raw"].update(cuda_pass(args.ops, log=sys.stderr))
    elif result["raw"].get("cuda_sources") not in (None, _cuda_digest()):
        print("the stored CUDA counts are from other sources than this tree's: left out "
              "(--cuda counts them again)", file=sys.stderr)
        for key in ("cuda", "cuda_sass", "cuda_dispatch_us", "cuda_sources"):
            result["raw"].pop(key, None)
    result["rates"] = model.RATES
    result["records"] = records(result)
    if args.json:  # first: the table below may go to a closed pipe
        # The records without their per-launch detail: the raw passes hold it.
        stored = dict(result, records=[{k: v for k, v in r.items() if k != "detail"}
                                       for r in result["records"]])
        with open(args.json, "w") as f:
            json.dump(stored, f, indent=None, separators=(",", ":"))
            f.write("\n")
    print(f"# Performance model ({result['mode']} mode), predictions for an H200\n")
    print(op_table(result["records"]))
    if args.launches:
        for record in result["records"]:
            if record["backend"] == "triton":
                print(f"\n## {record['op']}\n\n{launch_table(record)}")
            elif record.get("detail"):
                print(f"\n## {record['op']} (CUDA)\n\n{cuda_launch_table(record)}")
    print(f"\nRates:\n{rates_text()}\n\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
