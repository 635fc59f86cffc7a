"""The CUDA kernels on the CPU emulation (tests/cuda_emulation), against the float64 reference.

No GPU or CUDA toolkit needed, only g++ (the tests skip without it). The kernels' source
(csrc/*_kernels.cuh: affinity and the Gram path's operands, cosine distances, CRAM's row
kernels, the anomaly map's distance, combine and score kernels) and the launches the
extension makes are compiled for the CPU; the same run is
``python -m tests.cuda_emulation``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.cuda_emulation import run as emulation

pytestmark = pytest.mark.skipif(emulation.compiler() is None,
                                reason="no C++ compiler (g++ or $CXX) for the CUDA emulation")


@pytest.fixture(scope="module")
def affinity_results():
    return {r.case: r for r in emulation.run_affinity(emulation.AFFINITY_CASES)}


@pytest.mark.parametrize("case", [c.name for c in emulation.AFFINITY_CASES])
def test_affinity_kernels_match_reference(affinity_results, case):
    result = affinity_results[case]
    assert result.failures() == []
    assert result.grad_errs, "no gradient was compared"


@pytest.mark.parametrize("case", [c.name for c in emulation.GRAM_OPERANDS_CASES])
def test_gram_operand_kernel_matches_reference(case):
    (result,) = emulation.run_gram_operands(
        [c for c in emulation.GRAM_OPERANDS_CASES if c.name == case])
    assert result.failures() == []
    assert set(result.errors) == {"values", "tf32", "zero pixels"}


@pytest.mark.parametrize("case", [c[0] for c in emulation.GRAM_STEP_CASES])
def test_gram_loss_and_coefficient_kernels_match_reference(case):
    (result,) = emulation.run_gram_steps([case])
    assert result.failures() == []
    assert {"loss sum", "K side 0", "K side 1 tf32"} <= set(result.errors)


@pytest.fixture(scope="module")
def cosine_results():
    return {r.case: r for r in emulation.run_cosine(emulation.COSINE_CASES)}


@pytest.mark.parametrize("case", [c.name for c in emulation.COSINE_CASES])
def test_cosine_distance_kernels_match_reference(cosine_results, case):
    result = cosine_results[case]
    assert result.failures() == []
    assert {"pixel", "channel", "sample", "grad_student"} <= set(result.errors)


@pytest.mark.parametrize("case", [c.name for c in emulation.ANOMALY_MAP_CASES])
def test_anomaly_map_distance_kernel_matches_reference(case):
    (result,) = emulation.run_anomaly_map(
        [c for c in emulation.ANOMALY_MAP_CASES if c.name == case])
    assert result.failures() == []
    assert set(result.errors) == {"distance", "padding"}


@pytest.mark.parametrize("case", [c.name for c in emulation.COMBINE_CASES])
def test_anomaly_map_combine_kernels_match_reference(case):
    (result,) = emulation.run_anomaly_map_combine(
        [c for c in emulation.COMBINE_CASES if c.name == case])
    assert result.failures() == []
    assert set(result.errors) == {"maps", "scores"}


@pytest.mark.parametrize("case", [c.name for c in emulation.CRAM_CASES])
def test_cram_kernels_match_reference(case):
    (result,) = emulation.run_cram([c for c in emulation.CRAM_CASES if c.name == case])
    assert result.failures() == []
    assert {"central", "assign", "grad_embedding", "grad_log_tau"} <= set(result.errors)


def test_comparison_catches_a_perturbed_result(affinity_results):
    # The same comparison on outputs moved by 1e-3 (loss) and 1e-2 (one gradient) must fail.
    case = next(c for c in emulation.AFFINITY_CASES if c.name == "intra-tiled-l1")
    result = affinity_results[case.name]
    inputs = emulation.affinity_inputs(case)
    grads = {i: result.outputs[f"grad_{name}"]
             for i, name in enumerate(emulation.INPUT_NAMES["intra"])}
    moved = emulation.compare_affinity(case, inputs, result.outputs["loss"] * 1.001, grads, 0.75)
    assert any(f.startswith("loss") for f in moved.failures())
    grads[1] = grads[1] * 1.01
    moved = emulation.compare_affinity(case, inputs, result.outputs["loss"], grads, 0.75)
    assert any(f.startswith("grad student") for f in moved.failures())


def test_tensor_core_products_are_rounded_not_fp32(affinity_results):
    # The tf32 (WMMA) path computes something else than the fp32 FMA one on the same inputs,
    # and only the FMA one is within fp32 rounding of float64.
    mma = emulation.AFFINITY_CASES[[c.name for c in emulation.AFFINITY_CASES]
                                   .index("intra-tiled-l2-mma")]
    fma = dataclasses.replace(mma, name="intra-tiled-l2-fma", mma=False)
    (fma_result,) = emulation.run_affinity([fma])
    assert fma_result.failures() == []
    mma_result = affinity_results[mma.name]
    assert not torch.equal(fma_result.outputs["loss"], mma_result.outputs["loss"])
    assert fma_result.loss_err < 1e-6 < mma_result.loss_err


def _selftest(check: int, *tensors: torch.Tensor, ints: tuple[int, ...] = ()) -> torch.Tensor:
    exe = emulation.build("selftest")
    (out,) = emulation.run_driver(exe, [([check, *ints], list(tensors) or [torch.zeros(0)])])
    return out


def test_cuda_cram_backward_memory_at_a_thousand_images():
    """The CUDA backward's extra memory at D = 2048, K = 256, B = 1000 at 8 x 8 (issue #16
    part 4: at most 256 MB): delta (P, K), the rows' delta sums and log-tau terms (P each),
    the fp32 centres and their gradient (K, D each), and one chunk of images' temporaries
    (csrc/cram_host.h: the (K, D) centre-gradient partial per image and the per-image
    products; for a half-precision embedding also its fp32 copy and fp32 gradient)."""
    B, N, K, D = 1000, 64, 256, 2048
    P = B * N
    for convert in (0, 1):
        chunk = int(_selftest(3, ints=(B, D, N, K, convert)).item())
        per_image = 4 * (K * D + D * N + (2 * D * N if convert else 0))
        extra = 4 * (P * K + 2 * P + 2 * K * D) + chunk * per_image
        assert 1 <= chunk < B
        assert extra <= 256e6, (convert, chunk, extra)
    # The benchmark shape (B = 16, K = 64) runs in one chunk.
    assert int(_selftest(3, ints=(16, 2048, 64, 64, 0)).item()) == 16


def test_emulated_warp_shuffles_exchange_between_lanes():
    out = _selftest(0)
    assert torch.equal(out, torch.full((64,), float(sum(range(1, 33)))))


def test_emulated_wmma_truncates_operands_to_tf32():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 16, generator=g)  # [k][row]
    b = torch.randn(8, 16, generator=g)  # [k][column]
    d = _selftest(1, a, b).reshape(16, 16)

    def truncated(x):
        return (x.view(torch.int32) & -8192).view(torch.float32).double()

    want = truncated(a).T @ truncated(b)
    assert (d.double() - want).abs().max() <= 1e-6 * want.abs().max()
    exact = a.double().T @ b.double()
    assert (d.double() - exact).abs().max() > 1e-5 * exact.abs().max()  # truncation is seen


def test_emulation_stops_on_a_barrier_that_cannot_open():
    with pytest.raises(RuntimeError, match="deadlock"):
        _selftest(2)


def test_driver_refuses_a_short_record():
    # A record with too few floats is refused, not read past its end.
    exe = emulation.build("selftest")
    with pytest.raises(RuntimeError, match="exited with status"):
        emulation.run_driver(exe, [([1], [torch.zeros(3)])])
