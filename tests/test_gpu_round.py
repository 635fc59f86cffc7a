"""The GPU round's scripts, run on this machine before a GPU sees them.

- ``scripts/gpu_smoke.py`` on the CPU: every op x backend at small shapes, Triton under its
  interpreter, CUDA skipped with the reason; its records are checked, not just its exit code.
- ``scripts/gpu_report.py`` on partial output: the report is written whatever is missing.
- ``scripts/gpu_check.sh`` end to end with short limits: a step cut off at its limit is
  stopped with SIGINT and still leaves its summary; the round stays within its deadline,
  writes report.md and at most 8 files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import HAS_GPU, NO_TRITON

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "scripts" / "gpu_smoke.py"
REPORT = ROOT / "scripts" / "gpu_report.py"
PROFILE = ROOT / "scripts" / "gpu_profile.py"
CHECK = ROOT / "scripts" / "gpu_check.sh"
OPS = ["cosine_distances", "intra_affinity_loss/l2", "intra_affinity_loss/l1",
       "inter_affinity_loss/l2", "inter_affinity_loss/l1", "snl_distillation_loss", "cram",
       "anomaly_map"]

pytestmark = pytest.mark.skipif(HAS_GPU, reason="the CPU run of the round's scripts; on a GPU "
                                "the round itself runs them at full size")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SNL_"))}
    env["TRITON_INTERPRET"] = "1"
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("smoke") / "smoke.json"
    proc = subprocess.run([sys.executable, str(SMOKE), "--out", str(out)], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


def test_smoke_runs_every_op_and_backend_on_cpu(smoke):
    data, proc = smoke
    records = {(r["op"], r["backend"]): r for r in data["records"]}
    assert sorted(records) == sorted((op, b) for op in OPS for b in ("torch", "triton", "cuda"))
    for op in OPS:
        ref = records[(op, "torch")]
        assert ref["ran"], ref
        # The reference in fp32 against itself in float64: rounding only.
        assert ref["within_tol"], ref
        assert ref["max_err"] < 1e-4, ref
        assert ref["ms"] > 0, ref
        assert ref["x_eager"] == 1.0
        triton = records[(op, "triton")]
        if NO_TRITON:
            assert not triton["ran"]
            assert "Triton" in triton["skipped"]
        else:
            # The kernels' results against the reference on the same inputs, with gradients.
            assert triton["ran"], triton
            assert triton["within_tol"], triton
            assert triton["max_err"] < 1e-4, triton
            assert triton["ms"] > 0
            assert triton["x_eager"] > 0
            if op != "anomaly_map":
                assert triton["max_err_grad"] is not None, triton
        cuda = records[(op, "cuda")]
        assert not cuda["ran"], cuda
        assert cuda["skipped"], cuda  # no GPU here: skipped with the reason
        assert ("gbps" in ref) != ("tflops" in ref)
        assert ref["target_ms"] is not None or ref["target"], ref
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_smoke_reports_an_error_against_the_reference(tmp_path):
    """The comparison can fail: a tolerance below the kernels' rounding flags them."""
    if NO_TRITON:
        pytest.skip(NO_TRITON)
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SMOKE), "--out", str(out), "--ops", "cram",
                           "--backends", "torch", "triton", "--tol", "0"], env=_env(),
                          capture_output=True, text=True, timeout=600)
    records = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert records["torch"]["max_err"] > 0  # fp32 against the float64 reference
    assert records["triton"]["max_err"] > 0
    assert not records["triton"]["within_tol"]
    assert proc.returncode == 1
    assert "OFF" in proc.stdout


def test_report_from_partial_output(smoke, tmp_path):
    data, _ = smoke
    (tmp_path / "smoke.json").write_text(json.dumps(data))
    (tmp_path / "tests.log").write_text(
        "....F\n!!! KeyboardInterrupt !!!\nFAILED tests/test_x.py::test_y - AssertionError\n"
        "1 failed, 4 passed in 12.0s\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("env\t3\t0\t20\nbuild\t70\t124\t70\nsmoke\t9\t0\t70\ntests\t90\t124\t90\n")
    proc = subprocess.run([sys.executable, str(REPORT), str(tmp_path), str(steps)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "report.md").read_text()
    first_table = next(line for line in report.splitlines() if line.startswith("|"))
    assert first_table.startswith("| op | backend | ran | error")
    for op in OPS:
        assert f"| {op} | triton |" in report
    assert "1 failed, 4 passed" in report
    assert "FAILED tests/test_x.py::test_y" in report
    assert "stopped at its time limit" in report
    assert "(the profile step wrote nothing" in report
    assert "## Build (did not pass)" in report
    assert "bench.json was not written" in report


def test_report_tables_the_training_step_and_snl_over_rd(tmp_path):
    def bench(kind, structure, mode, fused, median, per_s=None):
        info = {"kind": kind, "structure": structure, "mode": mode, "fused": fused, "batch": 16}
        if per_s is not None:
            info["images_per_s"] = per_s
        return {"name": f"test_{kind}[{structure}-{mode}]", "extra_info": info,
                "stats": {"median": median}}

    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_copy", "extra_info": {"gbps": 3000.0}, "stats": {"median": 0.001}}]}))
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"benchmarks": [
        bench("training_step", "snl", "eager", True, 0.055),
        bench("training_step", "rd", "eager", True, 0.050),
        bench("training_step", "snl", "graph", True, 0.044),
        bench("inference", "snl", "bf16", True, 0.02, 3200.0)]}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("step\t100\t0\t120\n")
    proc = subprocess.run([sys.executable, str(REPORT), str(tmp_path), str(steps),
                           "--step-bench", str(step)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "report.md").read_text()
    assert "## Training step and inference (bench_training_step.py)" in report
    assert "| training_step | snl | eager | fused | 16 | 55 |  |" in report
    assert "| inference | snl | bf16 | fused | 16 | 20 | 3200 |" in report
    # the ratio only where both structures ran
    assert "| training_step | eager | fused | 1.1 |" in report
    assert "| training_step | graph |" not in report
    # merged into bench.json beside the kernel benchmarks
    names = [b["name"] for b in json.loads((tmp_path / "bench.json").read_text())["benchmarks"]]
    assert names[0] == "test_copy"
    assert len(names) == 5


def test_profile_runs_on_cpu(tmp_path):
    """gpu_profile.py at small shapes: the fused loss profiled (CPU operators by self time,
    its two autograd functions among them), a CUDA case skipped with the reason, the graph
    capture skipped without a GPU."""
    if NO_TRITON:
        pytest.skip(NO_TRITON)
    out = tmp_path / "profile.md"
    proc = subprocess.run([sys.executable, str(PROFILE), "--out", str(out), "--steps", "1",
                           "--cases", "loss-l2", "intra-l1-cuda"], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("## Profile: one forward and backward step")
    assert "| case | GPU ms | host ms (enqueue) | kernels per step |" in text
    row = next(line for line in text.splitlines()
               if line.startswith("| snl_distillation_loss l2 (shared triton) |"))
    assert float(row.split("|")[3]) > 0  # the host time of a step
    assert "| intra_affinity_loss l1 cuda |" in text
    assert "skipped: intra_affinity_loss: backend='cuda' cannot run" in text
    assert "| skipped: no CUDA GPU |" in text
    assert "_SharedBackward" in text
    assert "CPU operators by self time" in text


def test_profile_puts_the_models_prediction_beside_cuda_kernels():
    """The profile's CUDA kernel names (demangled, with parameters) find the model's
    per-kernel predictions of the committed table."""
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import gpu_profile as p\n"
        "model = p.predicted_by_kernel()\n"
        "name = ('void snl::(anonymous namespace)::cosine_distances_fwd_pixel_kernel<float, "
        "32, 4>(float const*, float const*, snl::Strides4, snl::Strides4, long, long)')\n"
        "key = p.kernel_key(name)\n"
        "assert key == 'snl::(anonymous namespace)::cosine_distances_fwd_pixel_kernel<float, "
        "32, 4>', key\n"
        "assert model[('cosine_distances', 'cuda')][key] > 0\n"
        "assert p.MODEL_OPS['cosine-cuda'] == ('cosine_distances', 'cuda')\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-2000:]


def test_gpu_check_always_reports_within_its_deadline(tmp_path):
    """The whole round with short limits: a test step cut off by SIGINT keeps its summary."""
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout is not installed")
    tests = tmp_path / "slow_tests"
    tests.mkdir()
    (tests / "test_slow.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\n"
        "def test_slow():\n    time.sleep(600)\n")
    out = tmp_path / "out"
    total = 100
    env = _env(TOTAL_S=str(total), LIMIT_BUILD="5", LIMIT_SMOKE="60", LIMIT_TESTS="20",
               LIMIT_BENCH="10", SMOKE_ARGS="--ops cram --backends torch", XDIST_WORKERS="1",
               LIMIT_PROFILE="30", PROFILE_ARGS="--cases intra-l1-cuda --steps 1",
               TEST_FILES=str(tests / "test_slow.py"), TEST_TIMEOUT_S="300",
               BENCH_FILES="benchmarks/bench_copy.py", LIMIT_STEP="10",
               STEP_BENCH_FILE="benchmarks/bench_copy.py")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(CHECK), str(out)], env=env, capture_output=True,
                          text=True, timeout=total + 60, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert elapsed <= total + 5, f"{elapsed:.0f} s for a {total} s round\n{proc.stdout}"
    assert proc.returncode == 1  # the build cannot pass here, and the slow test was cut off
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert "report.md" in files, files
    report = (out / "report.md").read_text()
    assert report.startswith("# GPU round"), report[:500]
    assert "| cram | torch | yes |" in report
    steps = {line.split(" | ")[0].strip("| "): line for line in report.splitlines()
             if line.startswith("| ") and line.count("|") == 5}
    assert " 124 " in steps["tests"], steps  # stopped at its limit
    log = (out / "tests.log").read_text()
    assert "KeyboardInterrupt" in log, log[-2000:]
    assert "1 passed" in log, log[-2000:]
    assert "stopped at its time limit" in report
    assert "## Profile: one forward and backward step" in report


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
def test_host_overhead_benchmark_runs():
    """The round's host-time step (benchmarks/bench_host_overhead.py), each provider once
    (pytest-benchmark disabled): its no-op launchers and, where the extension is built, its
    no-op CUDA kernels still fit the library's call path."""
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "-rs", str(ROOT / "benchmarks" / "bench_host_overhead.py")],
        env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 passed" in proc.stdout or "10 passed" in proc.stdout, proc.stdout[-2000:]
    from snl_kernels import _cuda

    if _cuda.has_op("cosine_distances_fwd"):
        assert "10 passed" in proc.stdout, proc.stdout[-2000:]


def test_report_puts_the_models_prediction_beside_the_measurement(tmp_path):
    sys.path.insert(0, str(REPORT.parent))
    try:
        import gpu_report
    finally:
        sys.path.pop(0)
    (tmp_path / "smoke.json").write_text(json.dumps({"records": [
        {"op": "intra_affinity_loss/l1", "backend": "triton", "ran": True, "ms": 12.0},
        {"op": "cram", "backend": "cuda", "ran": False, "error": "no GPU"}]}))
    table = tmp_path / "perf_model.json"
    table.write_text(json.dumps({"mode": "full", "sources": "abc", "records": [
        {"op": "intra_affinity_l1", "backend": "triton", "predicted_ms": 3.0,
         "predicted_graph_ms": 2.5},
        {"op": "cram", "backend": "cuda", "predicted_ms": None, "predicted_graph_ms": None}]}))
    lines = gpu_report.model_section(str(tmp_path), str(table))
    rows = [line for line in lines if line.startswith("| intra") or line.startswith("| cram")]
    assert rows == ["| intra_affinity_loss/l1 | triton | 3 | 2.5 | 12 | 4.00 |"]
    # the round's tree carries the table: the report finds it by default
    assert Path(gpu_report.MODEL_TABLE) == ROOT / "benchmarks" / "perf_model.json"


def test_report_reads_nsight_computes_raw_csv(tmp_path):
    sys.path.insert(0, str(REPORT.parent))
    try:
        import gpu_report
    finally:
        sys.path.pop(0)
    csv = tmp_path / "ncu.csv"
    csv.write_text(
        "==PROF== Connected to process 1234\n"
        '"ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum",'
        '"gpu__time_duration.sum","sm__warps_active.avg.pct_of_peak_sustained_active"\n'
        '"","","Gbyte","Mbyte","usecond","%"\n'
        '"0","_delta_group_kernel","1.25","300","1,250.5","42.5"\n')
    lines = gpu_report.ncu_section(str(csv))
    assert "| _delta_group_kernel | 1250 | 300 | 1250 | 42.5 |  |" in lines
    assert "no ncu output" in " ".join(gpu_report.ncu_section(str(tmp_path / "missing.csv")))
