"""Fold the GPU round's logs and JSON files into OUTDIR/report.md (scripts/gpu_check.sh).

    python scripts/gpu_report.py OUTDIR STEPS_TSV [--compile-bench JSON] [--step-bench JSON]
                                 [--profile MD] [--total S]

Reads what the round left in OUTDIR (env.log, build.log, smoke.json, tests.log, bench.json)
and the steps file (name, seconds, exit code, limit per line); any of them may be missing or
cut short, and the report says so instead of failing. The training-step benchmarks and the
torch.compile ones, each run into a JSON file of its own, are merged into bench.json; the
step's get a table of their own, with SNL's time over RD's per mode. The report's
first table is the smoke table: op, backend, ran, error, ms, target, ratio to eager and to
torch.compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def load_json(path: str | None) -> tuple[dict | None, str | None]:
    if not path or not os.path.exists(path):
        return None, f"{os.path.basename(path or '?')} was not written"
    try:
        with open(path) as f:
            return json.load(f), None
    except ValueError as exc:
        return None, f"{os.path.basename(path)} is not valid JSON ({exc})"


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[object]], align: str) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]]


def smoke_section(out: str) -> list[str]:
    data, problem = load_json(os.path.join(out, "smoke.json"))
    lines = ["## Smoke: every op x backend once (fwd+bwd; anomaly map fwd)", ""]
    if data is None:
        return [*lines, f"({problem}: see smoke.log)", ""]
    rows = []
    for r in data.get("records", []):
        if r.get("skipped"):
            ran, err = "skipped", r["skipped"]
        elif r.get("interrupted"):
            ran, err = "cut off", r.get("error", "")
        elif not r.get("ran"):
            ran, err = "FAILED", r.get("error", "")
        else:
            ran = "yes" if r.get("within_tol", True) else "OFF"
            err = f"{r.get('max_err', 0.0):.2e}"
        target = (f"{r['target_ms']} ms" if r.get("target_ms") is not None
                  else r.get("target") or "")
        x_compile = r.get("x_compile")
        if x_compile is not None and r.get("compile_ms_from") == "anchor":
            x_compile = f"{x_compile} (anchor)"
        rate = (f"{r['gbps']} GB/s" if "gbps" in r
                else f"{r['tflops']} TFLOP/s" if "tflops" in r else "")
        rows.append([r["op"], r["backend"], ran, err[:300] if isinstance(err, str) else err,
                     r.get("ms"), rate, target, r.get("x_eager"), x_compile])
    shapes = sorted({r["shapes"] for r in data.get("records", []) if r.get("shapes")})
    lines += table(["op", "backend", "ran", "error", "ms", "rate", "target",
                    "x eager", "x compile"], rows, ["---"] * 4 + ["---:"] * 2 + ["---"]
                   + ["---:"] * 2)
    lines += ["", f"Device: {data.get('device')}, torch {data.get('torch')}; shapes: "
              + "; ".join(shapes) + ". Error: against the reference in float64 on the same "
              "values; outputs: largest |kernel - reference| relative to the reference's "
              "largest magnitude; input gradients: ||kernel - reference|| / ||reference||; "
              "the larger of the two. x compile "
              "(anchor): against the H200 torch.compile anchor of BENCHMARKS.md, not measured "
              "in this run.", ""]
    return lines


#: The smoke's cases by the performance model's op names.
MODEL_OPS = {"cosine_distances": "cosine_distances",
             "intra_affinity_loss/l2": "intra_affinity_l2",
             "intra_affinity_loss/l1": "intra_affinity_l1",
             "inter_affinity_loss/l2": "inter_affinity_l2",
             "inter_affinity_loss/l1": "inter_affinity_l1",
             "snl_distillation_loss": "distillation_l2", "cram": "cram",
             "anomaly_map": "anomaly_map"}
MODEL_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks", "perf_model.json")


def model_section(out: str, table_path: str = MODEL_TABLE) -> list[str]:
    """The performance model's predictions (the table the round's tree carries) beside the
    smoke's measured times, per op x backend."""
    lines = ["## Performance model: predicted vs measured", ""]
    data, problem = load_json(os.path.join(out, "smoke.json"))
    model, model_problem = load_json(table_path)
    if data is None or model is None:
        return [*lines, f"({problem or model_problem})", ""]
    predicted = {(r["op"], r["backend"]): r for r in model.get("records", [])}
    rows = []
    for r in data.get("records", []):
        p = predicted.get((MODEL_OPS.get(r["op"], r["op"]), r["backend"]))
        if p is None or not r.get("ran"):
            continue
        ms = r.get("ms")
        eager = p.get("predicted_ms")
        rows.append([r["op"], r["backend"], eager, p.get("predicted_graph_ms"), ms,
                     f"{ms / eager:.2f}" if ms and eager else ""])
    lines += table(["op", "backend", "predicted ms (eager)", "predicted ms (graph)",
                    "measured ms", "measured / predicted"], rows,
                   ["---", "---"] + ["---:"] * 4)
    return [*lines, "", f"Predictions: benchmarks/perf_model.json (sources "
                        f"{model.get('sources')}, {model.get('mode')} mode); a prediction for "
                        "an H200. Measured: the smoke step above (its step includes the "
                        "loss's sum and the backward call).", ""]


#: Nsight Compute's metrics the round asks for, and their columns in the report.
NCU_COLUMNS = (("dram__bytes_read.sum", "DRAM read MB", 1e-6),
               ("dram__bytes_write.sum", "DRAM write MB", 1e-6),
               ("gpu__time_duration.sum", "us", 1e-3),
               ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy %", 1.0),
               ("sm__pipe_tensor_op_hgmma_cycles_active.avg.pct_of_peak_sustained_active",
                "HGMMA pipe %", 1.0))


def ncu_section(path: str | None) -> list[str]:
    """Nsight Compute's raw CSV page (``ncu --csv --page raw``): one row per profiled kernel.
    Units are normalised from the units row (bytes, ns) where it names them."""
    import csv

    text = read(path) if path else ""
    lines = ["## Nsight Compute: the fused l2 loss's kernels", ""]
    start = text.find('"ID"')
    if start < 0:
        return [*lines, "(no ncu output: ncu absent, not allowed to read counters, or cut off; "
                        "see smoke.log)", ""]
    rows = list(csv.reader(text[start:].splitlines()))
    head, units, data = rows[0], rows[1] if len(rows) > 1 else [], rows[2:]
    scale_of = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1.0,
                "usecond": 1e3, "msecond": 1e6, "%": 1.0}
    out = []
    for row in data:
        record = dict(zip(head, row, strict=False))
        cells = [record.get("Kernel Name", "?")[:60]]
        for metric, _, factor in NCU_COLUMNS:
            if metric not in head:
                cells.append(None)
                continue
            unit = units[head.index(metric)] if units else ""
            try:
                value = float(record[metric].replace(",", "")) * scale_of.get(unit, 1.0)
            except (KeyError, ValueError):
                cells.append(record.get(metric))
                continue
            cells.append(round(value * factor, 2))
        out.append(cells)
    lines += table(["kernel", *(name for _, name, _ in NCU_COLUMNS)], out,
                   ["---"] + ["---:"] * len(NCU_COLUMNS))
    return [*lines, "", "One step of the loss, clocks as found (--clock-control none); the "
                        "model's bytes and predicted times for these kernels: "
                        "`python -m snl_kernels.perf --from benchmarks/perf_model.json "
                        "--launches`.", ""]


def tests_section(out: str) -> list[str]:
    log = read(os.path.join(out, "tests.log"))
    summary = [line for line in log.splitlines()
               if re.search(r"\d+ (passed|failed|errors?|skipped)|no tests ran", line)]
    lines = ["## Kernel tests", "",
             f"- summary: {summary[-1].strip('= ') if summary else '(no summary line)'}"]
    if "KeyboardInterrupt" in log:
        lines.append("- stopped at its time limit (SIGINT): the summary counts what ran")
    problems = [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if problems:
        lines += ["", "```", *problems[:40], "```"]
        if len(problems) > 40:
            lines.append(f"({len(problems) - 40} more in tests.log)")
    return [*lines, ""]


STEP_KINDS = ("training_step", "inference")


def step_section(benchmarks: list[dict]) -> list[str]:
    """The training-step and inference benchmarks (bench_training_step.py): one row each,
    then SNL's median over RD's per (kind, mode, path)."""
    rows, medians = [], {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        if info.get("kind") not in STEP_KINDS:
            continue
        path = "fused" if info.get("fused") else "reference"
        median = b["stats"]["median"]
        rows.append([info["kind"], info["structure"], info["mode"], path, info.get("batch"),
                     median * 1e3, info.get("images_per_s")])
        medians.setdefault((info["kind"], info["mode"], path), {})[info["structure"]] = median
    if not rows:
        return []
    ratios = [[kind, mode, path, m["snl"] / m["rd"]]
              for (kind, mode, path), m in sorted(medians.items()) if {"snl", "rd"} <= set(m)]
    return ["## Training step and inference (bench_training_step.py)", "",
            *table(["kind", "structure", "mode", "path", "batch", "median ms", "images/s"],
                   rows, ["---"] * 5 + ["---:"] * 2), "",
            *table(["kind", "mode", "path", "SNL / RD"], ratios, ["---"] * 3 + ["---:"]), ""]


def bench_section(out: str, compile_json: str | None, step_json: str | None = None) -> list[str]:
    path = os.path.join(out, "bench.json")
    data, problem = load_json(path)
    benchmarks = list((data or {}).get("benchmarks", []))
    merged = data
    for extra_path in (step_json, compile_json):
        extra, _ = load_json(extra_path)
        if extra and extra.get("benchmarks"):
            benchmarks += extra["benchmarks"]
            merged = dict(merged or extra)
            merged["benchmarks"] = benchmarks
    if merged is not data:
        with open(path, "w") as f:
            json.dump(merged, f)
    lines = [*step_section(benchmarks), "## Benchmarks (pytest-benchmark)", ""]
    if not benchmarks:
        return [*lines, f"({problem or 'no benchmark ran'}: see bench.log)", ""]
    preferred = ["gbps", "frac_copy_bw", "peak_extra_mb"]
    keys = [k for k in preferred if any(k in b.get("extra_info", {}) for b in benchmarks)]
    rows = [[b["name"], b["stats"]["median"] * 1e3,
             *[b.get("extra_info", {}).get(k) for k in keys]] for b in benchmarks]
    return [*lines, *table(["name", "median ms", *keys], rows,
                           ["---"] + ["---:"] * (1 + len(keys))), ""]


def steps_section(steps_path: str, total: int | None) -> list[str]:
    rows = [line.split("\t") for line in read(steps_path).splitlines() if line.strip()]
    spent = sum(int(r[1]) for r in rows if len(r) > 1 and r[1].isdigit())
    lines = ["## Steps", ""]
    lines += table(["step", "seconds", "exit", "limit"], [r + [""] * (4 - len(r)) for r in rows],
                   ["---", "---:", "---:", "---:"])
    note = f"{spent} s in the steps" + (f", within the round's {total} s" if total else "")
    return [*lines, "", note + ". Exit 124: stopped by SIGINT at its limit; 137: killed "
                   "after the 10 s margin; skipped: no time left.", ""]


def header(out: str) -> list[str]:
    env = read(os.path.join(out, "env.log"))
    versions = "; ".join(line[len("version: "):] for line in env.splitlines()
                         if line.startswith("version: "))
    nvcc = re.search(r"Cuda compilation tools, release [^\n]*", env)
    toolkit = re.search(r"^cuda toolkit: (.*)$", env, re.M)
    card = re.search(r"^device: (.*)$", env, re.M)
    commit = os.environ.get("GIT_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown"
    if not os.environ.get("GIT_COMMIT") and git("status", "--porcelain"):
        commit += " (with local changes)"
    return [
        "# GPU round",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- card: {card.group(1) if card else '(unknown: see env.log)'}",
        f"- versions: {versions or '(see env.log)'}",
        f"- nvcc: {nvcc.group(0) if nvcc else '(not found)'}; toolkit: "
        f"{toolkit.group(1) if toolkit else '(not found)'}",
        f"- commit: {commit}",
        "- command: scripts/gpu_check.sh OUTDIR",
        "",
    ]


def build_section(out: str, steps_path: str) -> list[str]:
    rows = [line.split("\t") for line in read(steps_path).splitlines()]
    if any(r[0] == "build" and r[2:3] == ["0"] for r in rows if len(r) > 2):
        return []
    log = read(os.path.join(out, "build.log"))
    tail = [line for line in log.splitlines() if line.strip()][-25:]
    return ["## Build (did not pass)", "", "```", *tail, "```", ""]


def profile_section(path: str | None) -> list[str]:
    """The profile step's markdown as it was written (it is rewritten after every case)."""
    text = read(path) if path else ""
    if not text.strip():
        return ["## Profile", "", "(the profile step wrote nothing: see smoke.log)", ""]
    return [text.rstrip(), ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("steps", help="the round's steps file (tab-separated)")
    parser.add_argument("--compile-bench", help="JSON of the torch.compile benchmarks")
    parser.add_argument("--step-bench", help="JSON of the training-step benchmarks")
    parser.add_argument("--profile", help="markdown of the profile step (gpu_profile.py)")
    parser.add_argument("--ncu", help="CSV of the ncu step (ncu --csv --page raw)")
    parser.add_argument("--total", type=int, help="the round's time limit in seconds")
    args = parser.parse_args(argv)
    out = args.outdir
    sections = ((header, (out,)), (smoke_section, (out,)), (model_section, (out,)),
                (profile_section, (args.profile,)), (ncu_section, (args.ncu,)),
                (tests_section, (out,)),
                (build_section, (out, args.steps)), (steps_section, (args.steps, args.total)),
                (bench_section, (out, args.compile_bench, args.step_bench)))
    lines: list[str] = []
    for section, section_args in sections:
        try:
            lines += section(*section_args)
        except Exception as exc:  # one broken section must not cost the others
            lines += [f"({section.__name__} failed: {type(exc).__name__}: {exc})", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
