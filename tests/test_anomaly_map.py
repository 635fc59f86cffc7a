"""anomaly_map: kernels against the float64 reference (which matches scipy, test_reference.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, NO_TRITON, assert_matches_oracle, features, requires_gpu

import snl_kernels
from snl_kernels import reference
from snl_kernels.anomaly_map import blur_matrix, operators, upsample_matrix

triton_only = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")


def _levels(shapes, dtype=torch.float32, seed=0):
    pairs = [features(sh, dtype=dtype, seed=seed + k) for k, sh in enumerate(shapes)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _oracle(teachers, students, size, sigma, mode):
    return reference.anomaly_map([t.double() for t in teachers], [s.double() for s in students],
                                 size, sigma, mode)


@pytest.mark.parametrize(("n_out", "n_in"), [(16, 4), (13, 5), (5, 13), (7, 1), (1, 6), (8, 8)])
def test_upsample_matrix_is_align_corners_bilinear(n_out, n_in):
    x = torch.randn(3, 1, n_in, 2, dtype=torch.float64)
    want = F.interpolate(x, size=(n_out, 2), mode="bilinear", align_corners=True)
    got = torch.einsum("oi,bcij->bcoj", upsample_matrix(n_out, n_in), x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("n", "sigma"), [(20, 1.0), (9, 4.0), (3, 4.0), (1, 2.0), (64, 0.0)])
def test_blur_matrix_is_the_reference_blur(n, sigma):
    x = torch.randn(2, 1, n, 1, dtype=torch.float64)
    want = reference.gaussian_blur(x.expand(2, 1, n, 3).contiguous(), sigma)[..., :1]
    got = torch.einsum("oi,bcij->bcoj", blur_matrix(n, sigma), x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_operators_are_cached_and_padded():
    a = operators(((4, 4), (2, 2)), (8, 8), 1.0, 16, 16, "cpu")
    assert operators(((4, 4), (2, 2)), (8, 8), 1.0, 16, 16, "cpu") is a
    mh, mw = a
    assert mh.shape == (2, 8, 16)
    assert mw.shape == (2, 8, 16)
    assert mh[0, :, 4:].abs().max() == 0
    assert mh[1, :, 2:].abs().max() == 0


CASES = {
    "wrn50-like-3-levels": ([(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)], 64, 4.0, "add"),
    "non-square-odd": ([(1, 3, 7, 5)], (13, 29), 1.2, "add"),
    "size-not-multiple": ([(2, 4, 6, 6), (2, 8, 3, 3)], 20, 2.0, "add"),
    "no-blur": ([(2, 4, 6, 6), (2, 4, 3, 3)], 20, 0.0, "add"),
    "one-pixel-level": ([(1, 1, 1, 1)], 5, 4.0, "add"),
    "radius-beyond-image": ([(1, 5, 3, 3)], (6, 4), 4.0, "add"),
    "output-spans-tiles": ([(1, 6, 9, 11)], (70, 33), 1.0, "add"),
    "mul-two-levels": ([(2, 8, 16, 16), (2, 16, 8, 8)], (40, 24), 4.0, "mul"),
    "mul-three-levels-no-blur": ([(1, 4, 8, 8), (1, 4, 4, 4), (1, 4, 2, 2)], 16, 0.0, "mul"),
    "four-levels": ([(2, 4, 16, 16), (2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)], 32, 1.0, "add"),
}


@triton_only
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_matches_reference(case):
    shapes, size, sigma, mode = case
    teachers, students = _levels(shapes)
    got = snl_kernels.anomaly_map(teachers, students, size, sigma, mode, backend="triton")
    want = _oracle(teachers, students, size, sigma, mode)
    assert got.maps.dtype == torch.float32
    assert got.maps.shape == want.maps.shape
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)
    assert_matches_oracle(got.scores, want.scores, atol=1e-5)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_triton_low_precision_inputs(dtype):
    teachers, students = _levels([(2, 24, 8, 8), (2, 40, 4, 4)], dtype=dtype)
    got = snl_kernels.anomaly_map(teachers, students, 32, 2.0, backend="triton")
    want = _oracle(teachers, students, 32, 2.0, "add")
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)


@triton_only
def test_triton_any_strides():
    teachers, students = _levels([(2, 6, 8, 10), (2, 6, 4, 5)])
    views_t = [teachers[0].contiguous(memory_format=torch.channels_last),
               teachers[1].transpose(2, 3).contiguous().transpose(2, 3)]
    views_s = [students[0][:, :, :, :].contiguous(memory_format=torch.channels_last),
               torch.cat([students[1], students[1]], dim=1)[:, 6:]]
    got = snl_kernels.anomaly_map(views_t, views_s, (24, 30), 1.0, backend="triton")
    want = snl_kernels.anomaly_map(teachers, students, (24, 30), 1.0, backend="triton")
    assert torch.equal(got.maps, want.maps)


@triton_only
def test_triton_deterministic_bits():
    teachers, students = _levels([(2, 8, 16, 16), (2, 16, 8, 8)])
    a = snl_kernels.anomaly_map(teachers, students, 48, backend="triton")
    b = snl_kernels.anomaly_map(teachers, students, 48, backend="triton")
    assert torch.equal(a.maps, b.maps)
    assert torch.equal(a.scores, b.scores)


@triton_only
def test_opcheck():
    teachers, students = _levels([(2, 4, 8, 8), (2, 8, 4, 4)])
    torch.library.opcheck(torch.ops.snl_triton.anomaly_map.default,
                          (teachers, students, [16, 12], 1.0, "add"), test_utils=(
                              "test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_gradients_fall_back_to_reference_in_automatic_mode():
    teachers, students = _levels([(1, 4, 4, 4)])
    students = [s.requires_grad_(True) for s in students]
    out = snl_kernels.anomaly_map(teachers, students, 8)
    out.maps.sum().backward()
    assert students[0].grad is not None


def test_gradients_refused_by_kernels():
    teachers, students = _levels([(1, 4, 4, 4)])
    students = [s.requires_grad_(True) for s in students]
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match="the inputs require grad and the anomaly-map kernels are "
                             "inference-only"):
        snl_kernels.anomaly_map(teachers, students, 8, backend="triton")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [16, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrn50_on_gpu(batch, dtype):
    shapes = [(batch, 256, 64, 64), (batch, 512, 32, 32), (batch, 1024, 16, 16)]
    teachers, students = _levels(shapes, dtype=dtype)
    assert teachers[0].device.type == DEVICE
    got = snl_kernels.anomaly_map(teachers, students, 256, backend="triton")
    want = _oracle(teachers, students, 256, 4.0, "add")
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)
    assert_matches_oracle(got.scores, want.scores, atol=1e-5)
