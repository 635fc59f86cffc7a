#!/usr/bin/env bash
# One call on the GPU machine (no network): build the CUDA extension in place, run the tests and
# the benchmarks, and summarise them in OUTDIR/report.md. Every step is timed and limited; a
# failed step is recorded and the later steps still run. Total under 9.5 minutes.
#
#   scripts/gpu_check.sh OUTDIR
#
# OUTDIR (flat): report.md, info.log (nvidia-smi, versions, python -m snl_kernels), build.log,
# tests.log, bench.log, bench.json. Exit code: 0 when every step passed, else 1.
set -uo pipefail

if (($# != 1)); then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
STEPS=$OUT/.steps.tsv  # step, seconds, exit code; folded into report.md, then removed
: >"$STEPS"
# Step limits in seconds: together under 9.5 minutes (a device call may last 10).
# The sm_90-only build took 69 s on 2 cores here; with 16 jobs it should need far less. The
# tests JIT-compile every Triton specialisation and run Inductor on CUDA; the benchmarks
# compile the reference with torch.compile once per provider and shape.
BUILD_LIMIT_S=${BUILD_LIMIT_S:-100}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-200}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-240}

# step NAME LIMIT_S LOG CMD...: run CMD with a time limit, appending its output to LOG.
step() {
  local name=$1 limit=$2 log=$3 start ms rc
  shift 3
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  start=$(date +%s%N)
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - start) / 1000000))
  LAST_STEP_S=$((ms / 1000))
  printf '%s\t%d.%d\t%d\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) "$rc" >>"$STEPS"
  echo "   exit $rc after $((ms / 1000)) s" | tee -a "$log"
  return "$rc"
}

step "nvidia-smi" 20 "$OUT/info.log" nvidia-smi
step "versions" 30 "$OUT/info.log" "$PYTHON" -c '
import sys, torch
print("version: python", sys.version.split()[0])
print("version: torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("version: triton", triton.__version__)
except Exception as exc:
    print("version: triton not importable:", exc)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
'

# sm_90 only (H200), all cores. SNL_FORCE_CUDA: a skipped build is a failed step.
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 SNL_FORCE_CUDA=1
step "build: setup.py build_ext --inplace" "$BUILD_LIMIT_S" "$OUT/build.log" \
  "$PYTHON" setup.py build_ext --inplace
rc=$?
if ((rc != 0 && rc != 124 && rc != 137)); then
  # The fallback gets what is left of the build's time.
  step "build: pip install --no-build-isolation -e ." $((BUILD_LIMIT_S - LAST_STEP_S > 10 ? BUILD_LIMIT_S - LAST_STEP_S : 10)) \
    "$OUT/build.log" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
fi

step "python -m snl_kernels" 30 "$OUT/info.log" "$PYTHON" -m snl_kernels

SNL_REQUIRE_EXTENSION=1 step "tests" "$TESTS_LIMIT_S" "$OUT/tests.log" "$PYTHON" -m pytest tests -q

# Files given by name are collected whatever pytest's python_files pattern is.
shopt -s nullglob
# Default: every op and the copy ceiling, except torch.compile of the affinity references
# (minutes of warm-up; SPEC §5 has their anchors). BENCH_K="" times everything.
# shellcheck disable=SC2206  # word splitting and globbing wanted
BENCH_FILES=(${BENCH_FILES:-benchmarks/bench_copy.py benchmarks/bench_cosine_distances.py benchmarks/bench_anomaly_map.py benchmarks/bench_cram.py benchmarks/bench_affinity.py})
BENCH_K=${BENCH_K-not (test_affinity and compile)}
step "benchmarks" "$BENCH_LIMIT_S" "$OUT/bench.log" "$PYTHON" -m pytest "${BENCH_FILES[@]}" --benchmark-only \
  -k "$BENCH_K" --benchmark-min-rounds=20 --benchmark-max-time=0.2 --benchmark-json="$OUT/bench.json"

"$PYTHON" - "$OUT" <<'EOF'
import datetime
import json
import os
import re
import subprocess
import sys

out = sys.argv[1]


def read(name):
    try:
        with open(os.path.join(out, name), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as exc:  # the report is written whatever fails
        return f"({exc})"


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


info = read("info.log")
versions = "; ".join(
    line[len("version: "):] for line in info.splitlines() if line.startswith("version: ")
)
steps = [line.split("\t") for line in read(".steps.tsv").splitlines() if line]
lines = [
    "# GPU check",
    "",
    f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    "- card: " + run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader"]),
    f"- versions: {versions}",
    f"- commit: {run(['git', 'rev-parse', '--short', 'HEAD'])}"
    + (" (with local changes)" if run(["git", "status", "--porcelain"]) else ""),
]
build = [s for s in steps if s[0].startswith("build")]
if build:
    lines.append("- build: " + "; ".join(f"{s[0][7:]} {s[1]} s, exit {s[2]}" for s in build))

tests = read("tests.log")
summary = [l for l in tests.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", l)]
lines.append(f"- tests: {summary[-1].strip('= ') if summary else '(no summary line)'}")
problems = [l for l in tests.splitlines() if l.startswith(("FAILED", "ERROR"))]
if problems:
    lines += ["", "## Test failures", "", "```", *problems[:40], "```"]

lines += ["", "## Steps", "", "| step | seconds | exit |", "|---|---:|---:|"]
lines += [f"| {s[0]} | {s[1]} | {s[2]} |" for s in steps]

lines += ["", "## Benchmarks", ""]
try:
    with open(os.path.join(out, "bench.json")) as f:
        benchmarks = json.load(f)["benchmarks"]
except (OSError, ValueError, KeyError) as exc:
    benchmarks = []
    lines.append(f"(no bench.json: {type(exc).__name__}: {exc})")
if benchmarks:
    preferred = ["gbps", "frac_copy_bw", "peak_extra_mb"]
    keys = [k for k in preferred if any(k in b.get("extra_info", {}) for b in benchmarks)]
    keys += sorted({k for b in benchmarks for k in b.get("extra_info", {})} - set(keys))
    lines += ["| name | median ms | " + " | ".join(keys) + " |",
              "|---|---:|" + "---:|" * len(keys)]
    for b in benchmarks:
        extra = b.get("extra_info", {})
        cells = [fmt(b["name"]), f"{b['stats']['median'] * 1e3:.4f}"]
        cells += [fmt(extra[k]) if k in extra else "" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")

with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

failed=$(awk -F'\t' '$3 != 0' "$STEPS" | wc -l)
rm -f "$STEPS"
echo "== $failed failed step(s); report: $OUT/report.md"
((failed == 0))
