#!/usr/bin/env bash
# The GPU round: one call on the GPU machine (no network), at most 7 minutes, that always
# writes OUTDIR/report.md, whatever fails.
#
#   scripts/gpu_check.sh OUTDIR
#
# Steps, in the order a short window must answer them (limits in seconds; a step gets at most
# what is left before the 420 s deadline, so the last ones get what the first ones leave, and
# a later step still runs when an earlier one fails):
#   env      20  nvidia-smi, versions, nvcc --version, the toolkit's lib64/libcudart.so
#   build    70  the CUDA extension, sm_90 only, in place; 20 more to import it
#   smoke    70  scripts/gpu_smoke.py: every op x backend once at the benchmark shapes,
#                checked against the reference and timed with CUDA events
#   profile  40  scripts/gpu_profile.py: GPU and host time, kernels per step and the kernels
#                taking the most time of the fused loss and the affinity ops; a CUDA-graph
#                capture of the fused loss
#   ncu      45  Nsight Compute on the fused l2 loss's Triton kernels (DRAM bytes, occupancy,
#                tensor-pipe use), where ncu is installed
#   tests    90  the kernel tests, in parallel (12 pytest-xdist workers) with a per-test timeout
#   bench    80  the kernel-provider benchmarks (pytest-benchmark), the fused loss first
#   step    120  benchmarks/bench_training_step.py: SNL's and RD's training step and
#                inference, eager fp32, bf16 autocast and CUDA-graph captured (fused and
#                reference); its compile mode runs in the compile step, last
#   compile  rest torch.compile of the references: smoke records, then benchmarks
#   report   20  scripts/gpu_report.py folds everything into report.md
# Each step's limit leaves room for its 10 s kill margin before the deadline.
# Pytest and the smoke script are stopped with SIGINT (then killed 10 s later), so their
# summaries, failure lists and JSON files are still written.
#
# OUTDIR gets at most 8 files: report.md, env.log, build.log, smoke.json, smoke.log,
# tests.log, bench.json, bench.log. Exit code: 0 when every step passed, else 1.
#
# Overrides (for trying the script elsewhere, e.g. on a CPU): PYTHON, LIMIT_<STEP>
# (seconds), TOTAL_S (the deadline, default 420), TEST_FILES, BENCH_FILES, STEP_BENCH_FILE,
# TEST_TIMEOUT_S, XDIST_WORKERS, SMOKE_ARGS, PROFILE_ARGS.
set -uo pipefail

if (($# != 1)); then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
# The in-tree package, also for scripts/ and tests/ (nothing is installed on the GPU machine:
# a script's sys.path starts at its own folder, pytest's at tests/).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
TOTAL_S=${TOTAL_S:-420}
REPORT_RESERVE_S=20  # the report's 14 s limit and its 5 s kill margin
KILL_AFTER_S=10      # after the SIGINT at a step's limit, SIGKILL this much later
DEADLINE=$((START + TOTAL_S - REPORT_RESERVE_S))
STEPS=$(mktemp "${TMPDIR:-/tmp}/gpu-check-steps.XXXXXX")  # step, seconds, exit code, limit
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# The interpreter: $PYTHON, else the first of python3 / python that imports torch.
if [[ -z ${PYTHON:-} ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import torch' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
  PYTHON=${PYTHON:-$(command -v python3 >/dev/null && echo python3 || echo python)}
fi

# step NAME LIMIT LOG CMD...: run CMD with at most LIMIT seconds (less if the deadline is
# nearer), appending its output to LOG; SIGINT at the limit, SIGKILL KILL_AFTER_S later, so
# that even a killed step ends before the deadline.
step() {
  local name=$1 limit=$2 log=$3 start rc left
  shift 3
  left=$((DEADLINE - SECONDS - KILL_AFTER_S))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "== $name: skipped, ${left}s left before the deadline" | tee -a "$log"
    printf '%s\t0\tskipped\t0\n' "$name" >>"$STEPS"
    return 1
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  start=$SECONDS
  timeout --signal=INT --kill-after="$KILL_AFTER_S" "$limit" "$@" >>"$log" 2>&1
  rc=$?
  printf '%s\t%d\t%d\t%d\n' "$name" $((SECONDS - start)) "$rc" "$limit" >>"$STEPS"
  echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  return "$rc"
}

# pytest with the default SIGINT handler (a shell may start it with SIGINT ignored), so
# the interrupt at the limit ends it with its summary and JSON written.
PYTEST_PY=$(mktemp "${TMPDIR:-/tmp}/gpu-check-pytest.XXXXXX.py")
printf '%s\n' 'import signal, sys, pytest' \
  'signal.signal(signal.SIGINT, signal.default_int_handler)' \
  'sys.exit(pytest.main(sys.argv[1:]))' >"$PYTEST_PY"
PYTEST=("$PYTHON" "$PYTEST_PY")

# ---------------------------------------------------------------- env
env_info() {
  echo "date: $(date -Is)"
  nvidia-smi || echo "nvidia-smi: not available"
  echo "python: $PYTHON ($(command -v "$PYTHON"))"
  "$PYTHON" - <<'EOF'
import sys
from importlib import metadata
print("version: python", sys.version.split()[0])
for dist in ("torch", "triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout",
             "pytest-benchmark", "timm"):
    try:
        print(f"version: {dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"version: {dist} not installed")
import torch
print("version: torch.version.cuda", torch.version.cuda)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
  if command -v nvcc >/dev/null; then
    echo "nvcc: $(command -v nvcc)"
    nvcc --version
  else
    echo "nvcc: not on PATH"
  fi
  local nvcc_prefix dir found=""
  nvcc_prefix=$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")
  for dir in ${CUDA_HOME:-} "$nvcc_prefix/cuda" "$nvcc_prefix" /usr/local/cuda; do
    if [[ -e $dir/lib64/libcudart.so ]]; then
      found=$dir
      break
    fi
  done
  # The host compiler and the C++ runtime the process loads: an extension built with one
  # libstdc++ and run with another can crash where it formats numbers.
  echo "host compiler: ${CXX:-c++} ($(command -v "${CXX:-c++}")): $("${CXX:-c++}" --version 2>&1 | head -n 1)"
  "$PYTHON" -c 'import torch; print("libstdc++ loaded:", sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l}))' 2>&1
  if [[ -n $found ]]; then
    echo "cuda toolkit: $found has lib64/libcudart.so"
    echo "$found" >"$OUT/.cuda_home"
  else
    echo "cuda toolkit: no lib64/libcudart.so in ${CUDA_HOME:-} $nvcc_prefix/cuda $nvcc_prefix /usr/local/cuda"
  fi
}
export -f env_info
export PYTHON OUT
step env "${LIMIT_ENV:-20}" "$OUT/env.log" bash -c env_info
if [[ -f $OUT/.cuda_home ]]; then
  CUDA_HOME=${CUDA_HOME:-$(cat "$OUT/.cuda_home")}
  export CUDA_HOME
fi
rm -f "$OUT/.cuda_home"

# ---------------------------------------------------------------- build (sm_90 only)
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} SNL_FORCE_CUDA=1
step build "${LIMIT_BUILD:-70}" "$OUT/build.log" "$PYTHON" setup.py build_ext --inplace
step extension "${LIMIT_EXTENSION:-20}" "$OUT/build.log" "$PYTHON" -m snl_kernels
{
  echo "== the C++ runtime the extension links to"
  ldd snl_kernels/_C*.so 2>&1 | grep -E 'libstdc\+\+|libgcc_s' || echo "(ldd: none found)"
} >>"$OUT/build.log"
export SNL_REQUIRE_EXTENSION=1  # from here on, a missing extension fails tests, not skips

# ---------------------------------------------------------------- smoke
# shellcheck disable=SC2206  # word splitting wanted
SMOKE=("$PYTHON" scripts/gpu_smoke.py --out "$OUT/smoke.json" ${SMOKE_ARGS:---warm-jobs 8})
step smoke "${LIMIT_SMOKE:-70}" "$OUT/smoke.log" "${SMOKE[@]}"

# ---------------------------------------------------------------- profile of the fused loss
PROFILE_MD=$(mktemp "${TMPDIR:-/tmp}/gpu-check-profile.XXXXXX.md")
# shellcheck disable=SC2206  # word splitting wanted
PROFILE=("$PYTHON" scripts/gpu_profile.py --out "$PROFILE_MD" ${PROFILE_ARGS:-})
step profile "${LIMIT_PROFILE:-40}" "$OUT/smoke.log" "${PROFILE[@]}"

# ---------------------------------------------------------------- ncu on the fused loss's kernels
# DRAM bytes, achieved occupancy and tensor-pipe use of the fused l2 loss's Triton kernels (one
# step of the profile's loss case), where Nsight Compute is installed and may read counters
# (it did on the Firecracker machines, not on gVisor; a failure is recorded, not fatal).
NCU_CSV=$(mktemp "${TMPDIR:-/tmp}/gpu-check-ncu.XXXXXX.csv")
NCU_METRICS=dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum
NCU_METRICS+=,sm__warps_active.avg.pct_of_peak_sustained_active
NCU_METRICS+=,sm__pipe_tensor_op_hgmma_cycles_active.avg.pct_of_peak_sustained_active
if command -v ncu >/dev/null; then
  step ncu "${LIMIT_NCU:-45}" "$OUT/smoke.log" ncu --clock-control none --csv --page raw \
    --kernel-name 'regex:^_' --launch-count "${NCU_KERNELS:-14}" --metrics "$NCU_METRICS" \
    --log-file "$NCU_CSV" "$PYTHON" scripts/gpu_profile.py --out /dev/null --cases loss-l2 \
    --steps 1 --no-graph
else
  echo "== ncu: not on this machine (skipped; not a failure)" >>"$OUT/smoke.log"
fi

# ---------------------------------------------------------------- kernel tests
# shellcheck disable=SC2206
TEST_FILES=(${TEST_FILES:-tests/test_cosine_distances.py tests/test_affinity.py tests/test_cram.py tests/test_anomaly_map.py tests/test_triton_gpu_config.py tests/test_extension.py tests/test_dispatch.py tests/test_prepared_operands.py tests/test_distillation.py tests/test_distillation_op.py tests/test_gram_cuda_path.py})
PARALLEL=()
if "$PYTHON" -c 'import xdist' 2>/dev/null; then
  PARALLEL=(-n "${XDIST_WORKERS:-12}")
fi
TIMEOUT=()
if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then
  TIMEOUT=(--timeout "${TEST_TIMEOUT_S:-60}")
fi
existing=()
for f in "${TEST_FILES[@]}"; do [[ -e $f ]] && existing+=("$f"); done
step tests "${LIMIT_TESTS:-90}" "$OUT/tests.log" "${PYTEST[@]}" \
  "${existing[@]}" -q -rfE "${PARALLEL[@]}" "${TIMEOUT[@]}" -p no:cacheprovider

# ---------------------------------------------------------------- kernel-provider benchmarks
# The fused training loss and CRAM first: their targets are the open ones.
# shellcheck disable=SC2206
BENCH_FILES=(${BENCH_FILES:-benchmarks/bench_copy.py benchmarks/bench_distillation.py benchmarks/bench_cram.py benchmarks/bench_cosine_distances.py benchmarks/bench_anomaly_map.py benchmarks/bench_affinity.py benchmarks/bench_host_overhead.py})
BENCH_OPTS=(--benchmark-only --benchmark-min-rounds=10 --benchmark-max-time=0.1
  --benchmark-warmup=off -p no:cacheprovider -q)
step bench "${LIMIT_BENCH:-80}" "$OUT/bench.log" "${PYTEST[@]}" "${BENCH_FILES[@]}" \
  "${BENCH_OPTS[@]}" -k "not compile" --benchmark-json="$OUT/bench.json"

# ---------------------------------------------------------------- the whole step and inference
# Its JSON is merged into bench.json by the report; its log (SNL over RD per mode) into
# bench.log.
STEP_BENCH_FILE=${STEP_BENCH_FILE:-benchmarks/bench_training_step.py}
STEP_JSON=$(mktemp "${TMPDIR:-/tmp}/gpu-check-step.XXXXXX.json")
step step "${LIMIT_STEP:-120}" "$OUT/bench.log" "${PYTEST[@]}" "$STEP_BENCH_FILE" \
  --benchmark-only -p no:cacheprovider -q -k "not compile and not channels_last" \
  --benchmark-json="$STEP_JSON"

# ---------------------------------------------------------------- torch.compile, if time is left
COMPILE_JSON=$(mktemp "${TMPDIR:-/tmp}/gpu-check-compile.XXXXXX.json")
# CRAM first: its target is relative to torch.compile. The affinity references compile for
# minutes at these shapes: last, and left out of the benchmarks (their anchors are known).
step compile-smoke "$TOTAL_S" "$OUT/smoke.log" "$PYTHON" scripts/gpu_smoke.py \
  --out "$OUT/smoke.json" --append --backends compile --ops cram cosine_distances \
  anomaly_map inter_affinity_loss/l2 intra_affinity_loss/l1 intra_affinity_loss/l2 \
  inter_affinity_loss/l1
step compile-bench "$TOTAL_S" "$OUT/bench.log" "${PYTEST[@]}" "${BENCH_FILES[@]}" \
  "$STEP_BENCH_FILE" "${BENCH_OPTS[@]}" \
  -k "compile and not test_affinity and not test_distillation" \
  --benchmark-json="$COMPILE_JSON"

# ---------------------------------------------------------------- report (always)
timeout --kill-after=5 14 "$PYTHON" scripts/gpu_report.py "$OUT" "$STEPS" \
  --compile-bench "$COMPILE_JSON" --step-bench "$STEP_JSON" --profile "$PROFILE_MD" --ncu "$NCU_CSV" --total "$TOTAL_S" \
  >"$OUT/.report.log" 2>&1
rc=$?
if ((rc != 0)) || [[ ! -s $OUT/report.md ]]; then
  # The report script itself failed: a plain report from the shell, with its error.
  {
    echo "# GPU round (fallback report: scripts/gpu_report.py exited $rc)"
    echo
    echo "- date: $(date -Is); commit: $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    echo "| step | seconds | exit | limit |"
    echo "|---|---:|---:|---:|"
    awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$STEPS"
    echo
    echo '```'
    tail -n 40 "$OUT/.report.log"
    echo '```'
  } >"$OUT/report.md"
fi
rm -f "$OUT/.report.log" "$COMPILE_JSON" "$STEP_JSON" "$PROFILE_MD" "$PYTEST_PY"
failed=$(awk -F'\t' '$3 != 0' "$STEPS" | wc -l)
rm -f "$STEPS"
echo "== $failed step(s) did not pass; $((SECONDS - START)) s in all; report: $OUT/report.md"
cd "$ROOT" && ((failed == 0))
