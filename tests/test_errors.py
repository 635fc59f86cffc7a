"""Bad input raises errors that name the argument and show the value (part of the contract)."""

from __future__ import annotations

import pytest
import torch

import snl_kernels
from snl_kernels import reference


def _pair(shape=(2, 3, 4, 4), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


PAIR_OPS = {
    "cosine_distances": lambda t, s: snl_kernels.cosine_distances(t, s),
    "intra_affinity_loss": lambda t, s: snl_kernels.intra_affinity_loss(t, s),
    "reference.cosine_distances": lambda t, s: reference.cosine_distances(t, s),
    "reference.intra_affinity_loss": lambda t, s: reference.intra_affinity_loss(t, s),
}


@pytest.mark.parametrize("call", PAIR_OPS.values(), ids=PAIR_OPS)
class TestFeaturePairs:
    def test_shape_mismatch(self, call):
        t, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)
        with pytest.raises(ValueError, match=r"teacher and student must have the same shape, "
                                             r"got \(2, 3, 4, 4\) and \(2, 3, 4, 5\)"):
            call(t, s)

    def test_dtype_mismatch(self, call):
        t, s = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3, dtype=torch.float16)
        with pytest.raises(ValueError, match=r"same dtype, got torch.float32 and torch.float16"):
            call(t, s)

    def test_device_mismatch(self, call):
        t, s = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3, device="meta")
        with pytest.raises(ValueError, match=r"same device, got cpu and meta"):
            call(t, s)

    def test_wrong_ndim(self, call):
        t, s = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
        with pytest.raises(ValueError, match=r"teacher must be a 4-D tensor \(B, C, H, W\), "
                                             r"got shape \(2, 3, 16\)"):
            call(t, s)

    def test_empty(self, call):
        t, s = torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4)
        with pytest.raises(ValueError, match=r"teacher is empty, shape \(0, 3, 4, 4\)"):
            call(t, s)

    def test_integer_dtype(self, call):
        t = torch.ones(1, 2, 2, 2, dtype=torch.int64)
        with pytest.raises(TypeError, match=r"teacher must be float16, bfloat16, float32 or "
                                            r"float64, got torch.int64"):
            call(t, t)

    def test_not_a_tensor(self, call):
        with pytest.raises(TypeError, match=r"student must be a torch.Tensor, got list"):
            call(torch.randn(1, 2, 2, 2), [[1.0]])


@pytest.mark.parametrize("fn", [snl_kernels.intra_affinity_loss, reference.intra_affinity_loss])
def test_unknown_distance(fn):
    t, s = _pair()
    with pytest.raises(ValueError, match=r"distance must be one of 'l2', 'l1', got 'cosine'"):
        fn(t, s, distance="cosine")


LEVEL_OPS = {
    "spatial_channel_loss": lambda ts, ss: snl_kernels.spatial_channel_loss(ts, ss),
    "anomaly_map": lambda ts, ss: snl_kernels.anomaly_map(ts, ss, 16),
    "reference.anomaly_map": lambda ts, ss: reference.anomaly_map(ts, ss, 16),
}


@pytest.mark.parametrize("call", LEVEL_OPS.values(), ids=LEVEL_OPS)
class TestLevelLists:
    def test_different_number_of_levels(self, call):
        a, b = _pair((2, 3, 8, 8)), _pair((2, 5, 4, 4))
        with pytest.raises(ValueError, match=r"same number of levels, got 2 and 1"):
            call([a[0], b[0]], [a[1]])

    def test_empty_list(self, call):
        with pytest.raises(ValueError, match=r"teachers is an empty list"):
            call([], [])

    def test_a_tensor_instead_of_a_list(self, call):
        t, s = _pair()
        with pytest.raises(TypeError, match=r"teachers must be a list or tuple .*got Tensor"):
            call(t, s)

    def test_levels_of_different_batch(self, call):
        a, b = _pair((2, 3, 8, 8)), _pair((3, 5, 4, 4))
        with pytest.raises(ValueError, match=r"teachers\[0\] and teachers\[1\] must have the "
                                             r"same batch, got 2 and 3"):
            call([a[0], b[0]], [a[1], b[1]])

    def test_mismatched_pair_in_a_level(self, call):
        a, b = _pair((2, 3, 8, 8)), _pair((2, 5, 4, 4))
        with pytest.raises(ValueError, match=r"teachers\[1\] and students\[1\] must have the "
                                             r"same shape"):
            call([a[0], b[0]], [a[1], b[1][:, :4]])


@pytest.mark.parametrize("fn", [snl_kernels.anomaly_map, reference.anomaly_map])
class TestAnomalyMapOptions:
    @pytest.mark.parametrize("size", [0, (16, -1)])
    def test_non_positive_size(self, fn, size):
        t, s = _pair()
        with pytest.raises(ValueError, match=r"size must be positive"):
            fn([t], [s], size)

    def test_size_of_wrong_type(self, fn):
        t, s = _pair()
        with pytest.raises(TypeError, match=r"size must be an int or an \(H, W\) pair"):
            fn([t], [s], 16.0)

    def test_negative_sigma(self, fn):
        t, s = _pair()
        with pytest.raises(ValueError, match=r"sigma must be finite and >= 0 .*got -1"):
            fn([t], [s], 16, sigma=-1)

    def test_unknown_mode(self, fn):
        t, s = _pair()
        with pytest.raises(ValueError, match=r"mode must be one of 'add', 'mul', got 'max'"):
            fn([t], [s], 16, mode="max")


@pytest.mark.parametrize("fn", [snl_kernels.inter_affinity_loss, reference.inter_affinity_loss])
class TestInterAffinity:
    def test_coarse_level_finer_than_fine(self, fn):
        a, b = _pair((2, 3, 4, 4)), _pair((2, 5, 8, 8))
        with pytest.raises(ValueError, match=r"level b must not be finer than level a"):
            fn(a[0], b[0], a[1], b[1])

    def test_batch_mismatch_between_levels(self, fn):
        a, b = _pair((2, 3, 8, 8)), _pair((3, 5, 4, 4))
        with pytest.raises(ValueError, match=r"teacher_a and teacher_b must have the same batch"):
            fn(a[0], b[0], a[1], b[1])

    def test_student_shape(self, fn):
        a, b = _pair((2, 3, 8, 8)), _pair((2, 5, 4, 4))
        with pytest.raises(ValueError, match=r"teacher_b and student_b must have the same shape"):
            fn(a[0], b[0], a[1], b[1][:, :2])


@pytest.mark.parametrize("fn", [snl_kernels.cram, reference.cram])
class TestCram:
    def test_center_width(self, fn):
        with pytest.raises(ValueError, match=r"centers have width D=7 but embedding has D=8"):
            fn(torch.randn(2, 8, 4, 4), torch.randn(5, 7), 0.0)

    def test_no_centers(self, fn):
        with pytest.raises(ValueError, match=r"at least one centre \(K >= 1\), got K=0"):
            fn(torch.randn(2, 8, 4, 4), torch.randn(0, 8), 0.0)

    def test_embedding_not_4d(self, fn):
        with pytest.raises(ValueError, match=r"embedding must be a 4-D tensor \(B, D, h, w\), "
                                             r"got shape \(2, 8, 16\)"):
            fn(torch.randn(2, 8, 16), torch.randn(5, 8), 0.0)

    def test_centers_not_2d(self, fn):
        with pytest.raises(ValueError, match=r"centers must be a 2-D tensor \(K, D\)"):
            fn(torch.randn(2, 8, 4, 4), torch.randn(5, 8, 1), 0.0)

    def test_log_tau_not_scalar(self, fn):
        with pytest.raises(ValueError, match=r"log_tau must be a scalar"):
            fn(torch.randn(2, 8, 4, 4), torch.randn(5, 8), torch.zeros(2))

    def test_log_tau_not_finite(self, fn):
        with pytest.raises(ValueError, match=r"log_tau must be finite, got nan"):
            fn(torch.randn(2, 8, 4, 4), torch.randn(5, 8), float("nan"))


def test_reference_ignores_autocast():
    """Under autocast the reference still computes in float32 (DESIGN §2: fp32 accumulation)."""
    t, s = _pair((2, 8, 6, 6))
    want = reference.intra_affinity_loss(t, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reference.intra_affinity_loss(t.bfloat16(), s.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.intra_affinity_loss(t.bfloat16(), s.bfloat16()))
    torch.testing.assert_close(got, want, atol=1e-2, rtol=5e-2)
