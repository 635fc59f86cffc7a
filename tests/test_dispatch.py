"""Backend choice: argument, then SNL_BACKEND (read on every call), then automatic."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import HAS_GPU, NO_CUDA_BACKEND, NO_TRITON, features

import snl_kernels
from snl_kernels import dispatch


def test_explicit_torch_is_the_reference():
    t, s = features((2, 3, 4, 4), device="cpu")
    got = snl_kernels.cosine_distances(t, s, backend="torch")
    want = snl_kernels.reference.cosine_distances(t, s)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_unknown_backend_argument():
    t, s = features((1, 2, 2, 2), device="cpu")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cudnn'"):
        snl_kernels.cosine_distances(t, s, backend="cudnn")


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("SNL_BACKEND", "fastest")
    t, s = features((1, 2, 2, 2), device="cpu")
    with pytest.raises(ValueError, match=r"SNL_BACKEND must be one of .*got 'fastest'"):
        snl_kernels.cosine_distances(t, s)


def test_env_is_read_on_every_call(monkeypatch):
    tensors = [torch.zeros(1)]
    monkeypatch.setenv("SNL_BACKEND", "torch")
    assert dispatch.select_backend("op", None, tensors, ("triton",)) == "torch"
    monkeypatch.setenv("SNL_BACKEND", "cuda")
    with pytest.raises(snl_kernels.BackendUnavailableError, match=r"SNL_BACKEND='cuda'"):
        dispatch.select_backend("op", None, tensors, ("triton",))
    monkeypatch.setenv("SNL_BACKEND", "auto")
    assert dispatch.select_backend("op", None, tensors, ("triton",)) == "torch"


def test_argument_beats_env(monkeypatch):
    monkeypatch.setenv("SNL_BACKEND", "cuda")
    assert dispatch.select_backend("op", "torch", [torch.zeros(1)], ()) == "torch"


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
@pytest.mark.skipif(HAS_GPU, reason="checks the CPU interpreter path")
def test_env_selects_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("SNL_BACKEND", "triton")
    assert dispatch.select_backend("cosine_distances", None, [torch.zeros(1)],
                                   ("triton", "cuda")) == "triton"


def test_unimplemented_backend_lists_every_reason():
    tensors = [torch.zeros(1)]
    with pytest.raises(snl_kernels.BackendUnavailableError) as info:
        dispatch.select_backend("some_op", "cuda", tensors, ("triton",))
    msg = str(info.value)
    assert msg.startswith("some_op: backend='cuda' cannot run: ")
    assert "some_op has no cuda implementation yet" in msg
    if torch.version.cuda is None:
        assert "is a CPU build" in msg
    elif not HAS_GPU:
        assert "no CUDA GPU is visible" in msg
    assert "the CUDA kernels need CUDA tensors" in msg


def test_device_kinds_and_the_triton_reasons_beside_the_common_case():
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert dispatch._devices([cpu, cpu]) == {"cpu"}
    assert dispatch._devices([cpu, meta]) == {"cpu", "meta"}
    assert dispatch._devices([]) == set()
    if HAS_GPU:
        gpu = torch.zeros(1, device="cuda")
        assert dispatch._devices([gpu, gpu]) == {"cuda"}
        assert dispatch._devices([gpu, cpu]) == {"cpu", "cuda"}
    # Whatever answers the runnable case first, every other case still gets its reasons.
    if NO_TRITON is None:
        reasons = dispatch.unavailable_reasons("triton", "op", [cpu], ("triton",), "no float64")
        assert "no float64" in reasons
        reasons = dispatch.unavailable_reasons("triton", "op", [cpu, meta], ("cuda",))
        assert "op has no triton implementation yet" in reasons
        assert any("['meta']" in r for r in reasons)


@pytest.mark.skipif(NO_CUDA_BACKEND is None, reason="the CUDA backend is available here")
def test_cuda_unavailable_reason_names_the_cause():
    t, s = features((1, 2, 3, 3), device="cpu")
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match=r"cosine_distances: backend='cuda' cannot run: .*CUDA"):
        snl_kernels.cosine_distances(t, s, backend="cuda")


def test_automatic_falls_back_to_reference_on_cpu():
    tensors = [torch.zeros(1)]
    assert dispatch.select_backend("cosine_distances", None, tensors, ("triton", "cuda")) == "torch"


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none visible)")
def test_automatic_picks_a_kernel_on_gpu():
    chosen = dispatch.select_backend("cosine_distances", None, [torch.zeros(1, device="cuda")],
                                     ("triton", "cuda"))
    assert chosen in ("triton", "cuda")


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("intra_affinity_loss", lambda t, s: (t, s)),
        ("inter_affinity_loss", lambda t, s: (t, t[:, :, ::2, ::2], s, s[:, :, ::2, ::2])),
    ],
)
def test_affinity_ops_fall_back_to_the_reference_on_cpu(op, args):
    t, s = features((2, 4, 4, 4), device="cpu")
    fn = getattr(snl_kernels, op)
    want = getattr(snl_kernels.reference, op)(*args(t, s))
    if op == "intra_affinity_loss":
        # automatic on the CPU: the l2 loss in its PyTorch Gram form (C < N here), the same
        # math as the reference; l1 and backend="torch" get the reference itself
        from snl_kernels import gram_path

        assert torch.equal(fn(t, s), gram_path.intra_affinity_l2(t, s))
        torch.testing.assert_close(fn(t, s), want, rtol=1e-5, atol=1e-7)
        assert torch.equal(fn(t, s, "l1"), snl_kernels.reference.intra_affinity_loss(t, s, "l1"))
        assert torch.equal(fn(t, s, backend="torch"), want)
        return
    assert torch.equal(fn(*args(t, s)), want)  # automatic on the CPU: the reference


def test_info_command_prints_every_backend():
    out = subprocess.run([sys.executable, "-m", "snl_kernels"], capture_output=True, text=True,
                         check=True).stdout
    assert f"snl-kernels {snl_kernels.__version__}" in out
    assert f"torch       {torch.__version__}" in out
    for op in ("cosine_distances", "intra_affinity_loss", "inter_affinity_loss", "cram",
               "anomaly_map"):
        order = ", ".join(dispatch.AUTO_ORDER[op])
        assert f"  {op} (order: {order})\n" in out
    assert out.count("    torch   available") == 5
    if torch.version.cuda is None:
        assert "is a CPU build" in out


@pytest.mark.parametrize("op", sorted(dispatch.AUTO_ORDER))
def test_automatic_follows_the_measured_order(op, monkeypatch):
    """On CUDA tensors automatic mode takes the op's AUTO_ORDER: its first backend when all
    can run, the next when the first cannot, the reference when none can."""
    order = dispatch.AUTO_ORDER[op]
    monkeypatch.setattr(dispatch, "_devices", lambda tensors: {"cuda"})
    down: set[str] = set()
    monkeypatch.setattr(dispatch, "unavailable_reasons",
                        lambda backend, *a, **k: ["down"] if backend in down else [])
    tensors = [torch.zeros(1)]
    assert dispatch.select_backend(op, None, tensors, ("triton", "cuda")) == order[0]
    down.add(order[0])
    want = order[1] if len(order) > 1 else "torch"
    assert dispatch.select_backend(op, None, tensors, ("triton", "cuda")) == want
    down.update(("triton", "cuda"))
    assert dispatch.select_backend(op, None, tensors, ("triton", "cuda")) == "torch"
    # an explicit order still wins
    down.clear()
    assert dispatch.select_backend(op, None, tensors, ("triton", "cuda"),
                                   prefer=("triton",)) == "triton"


def test_automatic_order_from_the_h200_round():
    # Fastest first in BENCHMARKS.md's H200 smoke table (2026-11-30).
    assert dispatch.AUTO_ORDER["intra_affinity_loss"][0] == "triton"
    assert dispatch.AUTO_ORDER["inter_affinity_loss"] == ("torch",)
    assert dispatch.AUTO_ORDER["cosine_distances"][0] == "cuda"


def test_cuda_ready_case_beside_the_reasons(monkeypatch):
    """The CUDA backend's runnable case is answered from a set read once; every other case
    (another op, a reason of the call, other devices) still gets its reasons."""
    from snl_kernels import _cuda

    monkeypatch.setattr(dispatch, "_cuda_ready", None)
    if torch.version.cuda is None or not torch.cuda.is_available():
        assert dispatch.cuda_ready_ops() == frozenset()
        assert dispatch._cuda_ready is None  # not read until it can hold
    monkeypatch.setattr(dispatch, "_cuda_ready", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda, "load", lambda: True)
    monkeypatch.setattr(_cuda, "has_op", lambda name: name != "anomaly_map_combine")
    ready = dispatch.cuda_ready_ops()
    assert ready == frozenset(op for op in dispatch.CUDA_OPS if op != "anomaly_map")
    assert dispatch._cuda_ready is ready
    cuda = dispatch._ONLY_CUDA
    implemented = ("triton", "cuda")
    assert dispatch.unavailable_reasons("cuda", "cram", [], implemented, devices=cuda) == []
    why = dispatch.unavailable_reasons("cuda", "anomaly_map", [], implemented, devices=cuda)
    assert any("built without snl::anomaly_map_combine" in r for r in why)
    why = dispatch.unavailable_reasons("cuda", "cram", [], implemented, "no float64", cuda)
    assert why == ["no float64"]
    why = dispatch.unavailable_reasons("cuda", "cram", [], ("triton",), devices=cuda)
    assert why == ["cram has no cuda implementation yet"]
    why = dispatch.unavailable_reasons("cuda", "cram", [], implemented,
                                       devices=dispatch._CPU_AND_CUDA)
    assert any("need CUDA tensors" in r for r in why)


@pytest.mark.parametrize("value", [None, "", "triton", " Triton ", "AUTO", "héllo"])
def test_environment_reads_follow_os_environ(monkeypatch, value):
    """snl_kernels._env.get is os.environ.get, changes through os.environ included."""
    from snl_kernels import _env

    name = "SNL_TEST_ENV_READ"
    for _ in range(2):  # the second read comes from the decoded-value cache
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert _env.get(name) == os.environ.get(name)
    monkeypatch.setenv("SNL_BACKEND", " Triton ")
    assert dispatch.requested_backend(None) == "triton"
    monkeypatch.setenv("SNL_BACKEND", "AUTO")
    assert dispatch.requested_backend(None) is None
    monkeypatch.delenv("SNL_BACKEND")
    assert dispatch.requested_backend(None) is None
