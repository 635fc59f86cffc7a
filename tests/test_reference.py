"""Tie every op of ``snl_kernels.reference`` to an independent textbook form (DESIGN §2).

The textbook forms below are written from the spec alone, in float64, as plainly as possible:
``F.cosine_similarity``, N x N and C_a x C_b matrices materialised in full, a Python loop over
the CRAM centres, ``F.interpolate`` followed by ``scipy_ndimage.gaussian_filter``. None of them
calls into ``reference``. Gradients are checked with ``torch.autograd.gradcheck`` in float64.

Tolerances: a float64 reference agrees with a float64 textbook to rounding (atol ~1e-12); a
float32 reference is held to ~1e-5 absolute / 1e-4 relative against the float64 textbook of the
same (upcast) inputs, which is what fp32 accumulation gives on these small shapes.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snl_kernels import reference

scipy_ndimage = pytest.importorskip(
    "scipy.ndimage", reason="scipy is the blur oracle; pip install scipy"
)

EPS = 1e-8
F64 = torch.float64

TOL = {
    torch.float64: {"atol": 1e-12, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
}
# Low-precision inputs are upcast exactly and accumulated in fp32 (DESIGN §2): against the float64
# reference of the same upcast values only fp32 rounding remains.
LOW_PRECISION_TOL = {"atol": 1e-5, "rtol": 1e-4}


def randn(*shape, seed, scale=1.0):
    """Float64 standard normal of ``shape`` from its own generator (tests do not share state)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def expected_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Textbook forms (float64)
# ----------------------------------------------------------------------------------------------


def textbook_cosine_distances(teacher, student):
    """(pixel (B,H,W), channel (B,C), sample (B,)) as ``1 - F.cosine_similarity``."""
    t, s = teacher.double(), student.double()
    pixel = 1 - F.cosine_similarity(t, s, dim=1, eps=EPS)
    channel = 1 - F.cosine_similarity(t.flatten(2), s.flatten(2), dim=2, eps=EPS)
    sample = 1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1, eps=EPS)
    return pixel, channel, sample


def textbook_spatial_channel_loss(teachers, students):
    """(channel, spatial, rd): per-level means of the three distances, summed over levels."""
    channel = spatial = rd = torch.zeros((), dtype=F64)
    for t, s in zip(teachers, students, strict=True):
        pixel, per_channel, sample = textbook_cosine_distances(t, s)
        channel = channel + pixel.mean()
        spatial = spatial + per_channel.mean()
        rd = rd + sample.mean()
    return channel, spatial, rd


def textbook_affinity(features):
    """A = X^T X, (B, N, N), X = F / max(|F|_C, eps) per pixel, materialised in full."""
    x = features.double().flatten(2)  # (B, C, N)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(EPS)
    return x.transpose(1, 2) @ x


def textbook_intra_affinity_loss(teacher, student, distance):
    diff = textbook_affinity(teacher) - textbook_affinity(student)
    return diff.pow(2).mean() if distance == "l2" else diff.abs().mean()


def textbook_cross_affinity(fa, fb):
    """G = P^ Q^^T, (B, C_a, C_b): cosine between every channel map of level a and of level b."""
    fa, fb = fa.double(), fb.double()
    assert fa.shape[-2:] == (2 * fb.shape[-2], 2 * fb.shape[-1]), "tests use H_a = 2 H_b"
    p = F.avg_pool2d(fa, kernel_size=2, stride=2).flatten(2)  # (B, C_a, N_b)
    q = fb.flatten(2)  # (B, C_b, N_b)
    p = p / p.norm(dim=2, keepdim=True).clamp_min(EPS)
    q = q / q.norm(dim=2, keepdim=True).clamp_min(EPS)
    return torch.einsum("bin,bjn->bij", p, q)


def textbook_inter_affinity_loss(teacher_a, teacher_b, student_a, student_b, distance):
    diff = textbook_cross_affinity(teacher_a, teacher_b) - textbook_cross_affinity(
        student_a, student_b
    )
    return diff.pow(2).mean() if distance == "l2" else diff.abs().mean()


def textbook_cram(embedding, centers, log_tau):
    """(central (B,D,h,w), assign (B,K,h,w), compact (B,h,w)) by a loop over the centres."""
    e, c = embedding.double(), centers.double()
    tau = torch.exp(torch.as_tensor(log_tau, dtype=F64))
    dist = torch.stack(
        [(e - c[k][None, :, None, None]).pow(2).sum(dim=1) for k in range(c.shape[0])], dim=1
    )  # (B, K, h, w): |e_i - c_k|^2 summed directly, no expansion
    assign = torch.softmax(-dist / tau, dim=1)  # max-subtracted, stable for tiny tau
    central = sum(assign[:, k, None] * c[k][None, :, None, None] for k in range(c.shape[0]))
    compact = (assign * dist).sum(dim=1)
    return central, assign, compact


def textbook_anomaly_map(teachers, students, size, sigma, mode):
    """(maps (B,1,H,W), scores (B,)): bilinear align_corners upsample, sum/product, scipy blur."""
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    total = None
    for t, s in zip(teachers, students, strict=True):
        m = 1 - F.cosine_similarity(t.double(), s.double(), dim=1, eps=EPS)
        m = F.interpolate(m[:, None], size=out_size, mode="bilinear", align_corners=True)
        if total is None:
            total = m
        else:
            total = total + m if mode == "add" else total * m
    if sigma > 0:
        blurred = [
            scipy_ndimage.gaussian_filter(img, sigma, mode="reflect", truncate=4.0)
            for img in total[:, 0].detach().numpy()
        ]
        total = torch.from_numpy(np.stack(blurred))[:, None]
    return total, total.amax(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# cosine_distances / spatial_channel_loss
# ----------------------------------------------------------------------------------------------

COSINE_SHAPES = [
    pytest.param((2, 4, 3, 5), id="small-2x4x3x5"),
    pytest.param((1, 1, 1, 1), id="one-element"),
    pytest.param((2, 1, 4, 4), id="one-channel"),
    pytest.param((3, 6, 1, 1), id="one-pixel"),
    pytest.param((2, 6, 7, 5), id="odd-7x5"),
    pytest.param((1, 8, 4, 4), id="batch1"),
    pytest.param((2, 130, 1, 3), id="channels-past-128"),
]
FLOAT_DTYPES = [pytest.param(F64, id="float64"), pytest.param(torch.float32, id="float32")]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", COSINE_SHAPES)
def test_cosine_distances_matches_cosine_similarity(shape, dtype):
    teacher = randn(*shape, seed=1).to(dtype)
    student = (randn(*shape, seed=2) + 0.5 * teacher.double()).to(dtype)
    got = reference.cosine_distances(teacher, student)
    want = textbook_cosine_distances(teacher, student)
    B, C, H, W = shape
    for name, g, w, out_shape in zip(
        ("pixel", "channel", "sample"), got, want, ((B, H, W), (B, C), (B,)), strict=True
    ):
        assert g.shape == out_shape, name
        assert g.dtype == expected_dtype(dtype), name
        torch.testing.assert_close(g, w.to(g.dtype), **TOL[g.dtype], msg=name)


LEVEL_SETS = [
    pytest.param([(2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2)], id="three-levels"),
    pytest.param([(1, 5, 7, 5)], id="one-level-batch1-odd"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shapes", LEVEL_SETS)
def test_spatial_channel_loss_is_sum_of_level_means(shapes, dtype):
    teachers = [randn(*s, seed=10 + i).to(dtype) for i, s in enumerate(shapes)]
    students = [
        (randn(*s, seed=20 + i) + t.double()).to(dtype)
        for i, (s, t) in enumerate(zip(shapes, teachers, strict=True))
    ]
    got = reference.spatial_channel_loss(teachers, students)
    want = textbook_spatial_channel_loss(teachers, students)
    for name, g, w in zip(("channel", "spatial", "rd"), got, want, strict=True):
        assert g.shape == (), name
        assert g.dtype == expected_dtype(dtype), name
        torch.testing.assert_close(g, w.to(g.dtype), **TOL[g.dtype], msg=name)


def test_spatial_channel_loss_fields_are_not_swapped():
    # channel = mean of the *pixel* distance (cos over C), spatial = mean of the *channel*
    # distance (cos over H*W). A positive per-pixel scale leaves every pixel's direction alone
    # (pixel distance 0) but bends every channel map (channel and sample distances > 0).
    teacher = randn(2, 3, 4, 4, seed=3)
    student = teacher * torch.exp(2 * randn(2, 1, 4, 4, seed=4))
    got = reference.spatial_channel_loss([teacher], [student])
    pixel, channel, sample = textbook_cosine_distances(teacher, student)
    assert pixel.abs().max() < 1e-12
    assert channel.mean() > 0.1
    assert abs(channel.mean() - sample.mean()) > 1e-3
    torch.testing.assert_close(got.pixel_mean, pixel.mean(), **TOL[F64])
    torch.testing.assert_close(got.channel_mean, channel.mean(), **TOL[F64])
    torch.testing.assert_close(got.sample_mean, sample.mean(), **TOL[F64])


def test_cosine_distances_clamp_each_norm_separately():
    # cos = <x,y> / (max(|x|,eps) max(|y|,eps)), not <x,y> / max(|x||y|, eps): the two differ
    # when |x||y| < eps although each norm is above it, and when only one norm is below eps.
    teacher = randn(2, 4, 3, 3, seed=9)
    student = randn(2, 4, 3, 3, seed=10)
    teacher[0, :, 0, 0] *= 1e-5 / teacher[0, :, 0, 0].norm()  # |t| = |s| = 1e-5 at this pixel
    student[0, :, 0, 0] *= 1e-5 / student[0, :, 0, 0].norm()
    teacher[1, :, 2, 1] *= 1e-10 / teacher[1, :, 2, 1].norm()  # |t| below eps, |s| ~ 2
    teacher[1, 3] *= 1e-6 / teacher[1, 3].norm()  # channel maps with |t| |s| < eps
    student[1, 3] *= 1e-5 / student[1, 3].norm()
    got = reference.cosine_distances(teacher, student)
    want = textbook_cosine_distances(teacher, student)
    unclamped = 1 - (teacher[0, :, 0, 0] @ student[0, :, 0, 0]) / 1e-10
    torch.testing.assert_close(want[0][0, 0, 0], unclamped, **TOL[F64])  # premise
    for name, g, w in zip(("pixel", "channel", "sample"), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[F64], msg=name)


def _zero_vector_inputs():
    """B=3: zero pixel in both (b0); zero channel map in both, plus a teacher-only and a
    student-only zero pixel (b1); a whole sample of zeros in both (b2)."""
    teacher = randn(3, 4, 3, 5, seed=4)
    student = randn(3, 4, 3, 5, seed=5)
    teacher[0, :, 1, 2] = 0
    student[0, :, 1, 2] = 0
    teacher[1, 2] = 0
    student[1, 2] = 0
    teacher[1, :, 0, 0] = 0
    student[1, :, 2, 4] = 0
    teacher[2] = 0
    student[2] = 0
    return teacher, student


def test_cosine_distances_zero_vectors_finite_and_match_cosine_similarity_autograd():
    teacher, student = _zero_vector_inputs()
    weights = [randn(3, 3, 5, seed=6), randn(3, 4, seed=7), randn(3, seed=8)]

    def values_and_grads(fn):
        t = teacher.clone().requires_grad_()
        s = student.clone().requires_grad_()
        outs = fn(t, s)
        loss = sum((w * o).sum() for w, o in zip(weights, outs, strict=True))
        grad_t, grad_s = torch.autograd.grad(loss, (t, s))
        return [o.detach() for o in outs], grad_t, grad_s

    got, got_gt, got_gs = values_and_grads(lambda t, s: tuple(reference.cosine_distances(t, s)))
    want, want_gt, want_gs = values_and_grads(textbook_cosine_distances)

    pixel, channel, sample = got
    assert pixel[0, 1, 2] == 1
    assert pixel[1, 0, 0] == 1
    assert pixel[1, 2, 4] == 1
    assert channel[1, 2] == 1
    assert sample[2] == 1
    for name, g, w in zip(("pixel", "channel", "sample"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, **TOL[F64], msg=name)
    for name, g, w in (("d teacher", got_gt, want_gt), ("d student", got_gs, want_gs)):
        assert torch.isfinite(g).all(), name
        # The teacher-only zero pixel's gradient is s/(eps |s|) ~ 1e8: relative tolerance.
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9, msg=name)


# ----------------------------------------------------------------------------------------------
# intra_affinity_loss
# ----------------------------------------------------------------------------------------------

INTRA_SHAPES = [
    pytest.param((2, 3, 4, 4), id="C-below-N-3x16"),
    pytest.param((2, 16, 3, 3), id="N-below-C-9x16"),
    pytest.param((2, 5, 7, 5), id="odd-7x5"),
    pytest.param((1, 1, 3, 3), id="batch1-one-channel"),
    pytest.param((2, 4, 1, 1), id="one-pixel"),
    pytest.param((1, 9, 3, 3), id="N-equals-C"),
]
DISTANCES = [pytest.param("l2", id="l2"), pytest.param("l1", id="l1")]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", INTRA_SHAPES)
def test_intra_affinity_loss_matches_materialised_affinity(shape, distance, dtype):
    teacher = randn(*shape, seed=11).to(dtype)
    student = randn(*shape, seed=12).to(dtype)
    got = reference.intra_affinity_loss(teacher, student, distance=distance)
    want = textbook_intra_affinity_loss(teacher, student, distance)
    assert got.shape == ()
    assert got.dtype == expected_dtype(dtype)
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[got.dtype])


def test_intra_affinity_loss_default_distance_is_l2():
    teacher, student = randn(2, 3, 4, 4, seed=13), randn(2, 3, 4, 4, seed=14)
    got = reference.intra_affinity_loss(teacher, student)
    torch.testing.assert_close(got, textbook_intra_affinity_loss(teacher, student, "l2"))
    assert not torch.allclose(got, textbook_intra_affinity_loss(teacher, student, "l1"))


NEAR_SHAPES = [
    pytest.param((2, 64, 16, 16), id="near-C-below-N-64x256"),
    pytest.param((2, 64, 4, 4), id="near-N-below-C-16x64"),
]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", NEAR_SHAPES)
def test_intra_affinity_loss_student_near_teacher_does_not_cancel(shape, distance):
    # DESIGN §2.2: the naive Gram identity ||X_T X_T^T||^2 - 2||X_T X_S^T||^2 + ||X_S X_S^T||^2
    # cancels badly when student ~ teacher (up to 5% error in fp32); the reference must not.
    teacher = randn(*shape, seed=15)
    student = teacher * (1 + 0.01 * randn(*shape, seed=16))
    want = textbook_intra_affinity_loss(teacher, student, distance)
    assert want > 0
    got64 = reference.intra_affinity_loss(teacher, student, distance=distance)
    torch.testing.assert_close(got64, want, atol=0, rtol=1e-10)

    t32, s32 = teacher.float(), student.float()
    want32 = textbook_intra_affinity_loss(t32, s32, distance)  # same fp32 values, upcast
    got32 = reference.intra_affinity_loss(t32, s32, distance=distance)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want32, atol=0, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# inter_affinity_loss
# ----------------------------------------------------------------------------------------------

INTER_SHAPES = [
    pytest.param((2, 3, 8, 8), (2, 5, 4, 4), id="square-8x8-to-4x4"),
    pytest.param((2, 4, 6, 10), (2, 3, 3, 5), id="odd-6x10-to-3x5"),
    pytest.param((1, 1, 4, 4), (1, 1, 2, 2), id="batch1-one-channel"),
    pytest.param((2, 3, 2, 2), (2, 4, 1, 1), id="coarse-1x1"),
    pytest.param((1, 6, 8, 4), (1, 9, 4, 2), id="batch1-tall"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(("shape_a", "shape_b"), INTER_SHAPES)
def test_inter_affinity_loss_matches_materialised_cross_affinity(shape_a, shape_b, distance, dtype):
    ta, tb = randn(*shape_a, seed=21).to(dtype), randn(*shape_b, seed=22).to(dtype)
    sa, sb = randn(*shape_a, seed=23).to(dtype), randn(*shape_b, seed=24).to(dtype)
    got = reference.inter_affinity_loss(ta, tb, sa, sb, distance=distance)
    want = textbook_inter_affinity_loss(ta, tb, sa, sb, distance)
    assert got.shape == ()
    assert got.dtype == expected_dtype(dtype)
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[got.dtype])


@pytest.mark.parametrize("distance", DISTANCES)
def test_inter_affinity_loss_student_near_teacher(distance):
    ta, tb = randn(2, 16, 8, 8, seed=25), randn(2, 24, 4, 4, seed=26)
    sa = ta * (1 + 0.01 * randn(2, 16, 8, 8, seed=27))
    sb = tb * (1 + 0.01 * randn(2, 24, 4, 4, seed=28))
    want = textbook_inter_affinity_loss(ta, tb, sa, sb, distance)
    assert want > 0
    got64 = reference.inter_affinity_loss(ta, tb, sa, sb, distance=distance)
    torch.testing.assert_close(got64, want, atol=0, rtol=1e-10)
    low = [x.float() for x in (ta, tb, sa, sb)]
    got32 = reference.inter_affinity_loss(*low, distance=distance)
    want32 = textbook_inter_affinity_loss(*low, distance)
    torch.testing.assert_close(got32.double(), want32, atol=0, rtol=1e-4)


def test_inter_affinity_loss_pairs_teacher_levels_and_student_levels():
    # Argument order is (teacher_a, teacher_b, student_a, student_b): G_T pairs T_a with T_b and
    # G_S pairs S_a with S_b. A reference that paired T_a with S_b would give `crossed`.
    ta, tb = randn(2, 3, 4, 4, seed=29), randn(2, 2, 2, 2, seed=30)
    sa, sb = randn(2, 3, 4, 4, seed=31), randn(2, 2, 2, 2, seed=32)
    got = reference.inter_affinity_loss(ta, tb, sa, sb, distance="l1")
    torch.testing.assert_close(got, textbook_inter_affinity_loss(ta, tb, sa, sb, "l1"))
    crossed = (textbook_cross_affinity(ta, sb) - textbook_cross_affinity(sa, tb)).abs().mean()
    assert not torch.allclose(got, crossed)


# ----------------------------------------------------------------------------------------------
# cram
# ----------------------------------------------------------------------------------------------

CRAM_SHAPES = [
    pytest.param((2, 8, 4, 4), 5, id="small"),
    pytest.param((2, 16, 3, 5), 7, id="odd-3x5"),
    pytest.param((1, 3, 1, 1), 1, id="batch1-one-position-one-centre"),
    pytest.param((3, 6, 2, 2), 2, id="two-centres"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log_tau_kind", ["float", "tensor"])
@pytest.mark.parametrize(("shape", "K"), CRAM_SHAPES)
def test_cram_matches_loop_over_centres(shape, K, log_tau_kind, dtype):
    B, D, h, w = shape
    embedding = randn(*shape, seed=41).to(dtype)
    centers = randn(K, D, seed=42).to(dtype)
    log_tau = 0.7 if log_tau_kind == "float" else torch.tensor(0.7, dtype=dtype)
    got = reference.cram(embedding, centers, log_tau)
    want = textbook_cram(embedding, centers, 0.7)
    for name, g, wt, out_shape in zip(
        ("central", "assign", "compact"),
        got,
        want,
        ((B, D, h, w), (B, K, h, w), (B, h, w)),
        strict=True,
    ):
        assert g.shape == out_shape, name
        assert g.dtype == expected_dtype(dtype), name
        torch.testing.assert_close(g, wt.to(g.dtype), **TOL[g.dtype], msg=name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cram_large_distances_tiny_tau_stay_finite(dtype):
    # d ~ 1.6e5 and tau ~ 2.5e-3: -d/tau ~ -6e7, exp() underflows for every centre unless the
    # softmax subtracts its max. The stable loop form is (numerically) one-hot.
    embedding = randn(2, 8, 4, 4, seed=43, scale=100.0).to(dtype)
    centers = randn(6, 8, seed=44, scale=100.0).to(dtype)
    log_tau = -6.0
    want = textbook_cram(embedding, centers, log_tau)
    assert (want[1].amax(dim=1) > 1 - 1e-12).all()  # premise: no near-ties on this seed
    got = reference.cram(embedding, centers, log_tau)
    for name, g, wt in zip(("central", "assign", "compact"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, wt.to(g.dtype), **TOL[g.dtype], msg=name)


def test_cram_temperature_is_exp_log_tau():
    # A large log_tau gives an almost uniform assignment, a very negative one an almost hard
    # assignment: a reference that used tau = log_tau (or 1/tau) would fail one of these.
    embedding, centers = randn(1, 4, 2, 2, seed=45), randn(3, 4, seed=46)
    for log_tau in (-2.0, 0.0, 1.5, 4.0):
        got = reference.cram(embedding, centers, log_tau)
        torch.testing.assert_close(got.assign, textbook_cram(embedding, centers, log_tau)[1])


# ----------------------------------------------------------------------------------------------
# anomaly_map
# ----------------------------------------------------------------------------------------------

MAP_CASES = [
    pytest.param(2, [(4, 16, 16), (6, 8, 8), (8, 4, 4)], 32, id="three-levels-square"),
    pytest.param(2, [(4, 16, 16), (6, 8, 8), (8, 4, 4)], (24, 40), id="non-square-size"),
    pytest.param(2, [(3, 6, 5), (5, 3, 3)], (23, 37), id="not-multiple-of-levels"),
    pytest.param(1, [(5, 7, 9)], (13, 11), id="one-level-batch1"),
    pytest.param(2, [(3, 4, 4), (4, 2, 2)], (6, 5), id="radius-exceeds-size"),
]
SIGMAS = [
    pytest.param(0.0, id="sigma0"),
    pytest.param(1.0, id="sigma1"),
    pytest.param(1.2, id="sigma1.2-radius-rounds-up"),
    pytest.param(4.0, id="sigma4"),
]
MODES = [pytest.param("add", id="add"), pytest.param("mul", id="mul")]


def _map_inputs(B, levels, seed):
    teachers = [randn(B, *lv, seed=seed + i) for i, lv in enumerate(levels)]
    students = [
        randn(B, *lv, seed=seed + 50 + i) + t
        for i, (lv, t) in enumerate(zip(levels, teachers, strict=True))
    ]
    return teachers, students


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize(("B", "levels", "size"), MAP_CASES)
def test_anomaly_map_matches_interpolate_and_scipy(B, levels, size, sigma, mode, dtype):
    teachers, students = _map_inputs(B, levels, seed=60)
    teachers = [t.to(dtype) for t in teachers]
    students = [s.to(dtype) for s in students]
    got = reference.anomaly_map(teachers, students, size, sigma=sigma, mode=mode)
    want_maps, want_scores = textbook_anomaly_map(teachers, students, size, sigma, mode)
    H, W = (size, size) if isinstance(size, int) else size
    assert got.maps.shape == (B, 1, H, W)
    assert got.scores.shape == (B,)
    assert got.maps.dtype == got.scores.dtype == expected_dtype(dtype)
    torch.testing.assert_close(got.maps, want_maps.to(got.maps.dtype), **TOL[got.maps.dtype])
    torch.testing.assert_close(got.scores, want_scores.to(got.scores.dtype), **TOL[got.maps.dtype])


def test_anomaly_map_int_size_is_square_and_default_sigma_is_4():
    teachers, students = _map_inputs(2, [(3, 5, 5), (4, 3, 3)], seed=70)
    got = reference.anomaly_map(teachers, students, 12)
    want_maps, _ = textbook_anomaly_map(teachers, students, (12, 12), 4.0, "add")
    torch.testing.assert_close(got.maps, want_maps, **TOL[F64])
    torch.testing.assert_close(got.maps, reference.anomaly_map(teachers, students, (12, 12)).maps)


def _gaussian_taps(sigma):
    """Normalised weights w[-r..r], r = int(4 sigma + 0.5), as a dict offset -> weight."""
    r = int(4 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return {int(o): float(v) for o, v in zip(x, w, strict=True)}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sigma", [pytest.param(s, id=f"sigma{s:g}") for s in (1.0, 1.2, 2.0, 4.0)])
def test_anomaly_map_corner_impulse_reflects_edge_sample(sigma, dtype):
    # One level at the output size (align_corners upsample is the identity), distance 2 at one
    # corner pixel and ~0 elsewhere. Under scipy's "reflect" (d c b a | a b c d) the corner
    # sample is mirrored onto index -1, so the 1-D response at distance i from the corner is
    # w(i) + w(i + 1). ("mirror" would give w(i) + w(i + 2), "constant" just w(i).)
    H, W = 40, 36
    teacher = torch.ones(2, 3, H, W, dtype=F64)
    student = teacher.clone()
    student[0, :, 0, 0] = -1  # top-left corner of image 0
    student[1, :, H - 1, W - 1] = -1  # bottom-right corner of image 1
    taps = _gaussian_taps(sigma)

    def edge_response(n):
        return torch.tensor([taps.get(i, 0.0) + taps.get(i + 1, 0.0) for i in range(n)], dtype=F64)

    gh, gw = edge_response(H), edge_response(W)
    want = torch.zeros(2, 1, H, W, dtype=F64)
    want[0, 0] = 2 * gh[:, None] * gw[None, :]
    want[1, 0] = 2 * gh.flip(0)[:, None] * gw.flip(0)[None, :]
    got = reference.anomaly_map([teacher.to(dtype)], [student.to(dtype)], (H, W), sigma=sigma)
    tol = TOL[got.maps.dtype]
    torch.testing.assert_close(got.maps, want.to(got.maps.dtype), **tol)
    torch.testing.assert_close(got.maps[0, 0, 0], want[0, 0, 0].to(got.maps.dtype), **tol)
    torch.testing.assert_close(got.maps[1, 0, :, -1], want[1, 0, :, -1].to(got.maps.dtype), **tol)
    peak = 2 * (taps[0] + taps[1]) ** 2
    torch.testing.assert_close(got.scores, torch.full((2,), peak, dtype=got.scores.dtype), **tol)


# ----------------------------------------------------------------------------------------------
# Gradients (float64 gradcheck, small shapes, inputs away from kinks)
# ----------------------------------------------------------------------------------------------


def _leaf(*shape, seed, scale=1.0, shift=0.0):
    return (randn(*shape, seed=seed, scale=scale) + shift).requires_grad_()


def test_gradcheck_cosine_distances():
    teacher, student = _leaf(2, 3, 4, 4, seed=81), _leaf(2, 3, 4, 4, seed=82)
    assert torch.autograd.gradcheck(
        lambda t, s: tuple(reference.cosine_distances(t, s)), (teacher, student)
    )


@pytest.mark.parametrize(
    "output", [pytest.param(i, id=n) for i, n in enumerate(("pixel", "channel", "sample"))]
)
def test_gradcheck_cosine_distances_single_output(output):
    # Upstream gradient on one output only (the others get none): DESIGN §2.1 "any subset".
    teacher, student = _leaf(2, 3, 4, 4, seed=83), _leaf(2, 3, 4, 4, seed=84)
    assert torch.autograd.gradcheck(
        lambda t, s: reference.cosine_distances(t, s)[output], (teacher, student)
    )


def test_gradcheck_spatial_channel_loss():
    shapes = [(2, 3, 4, 4), (2, 4, 2, 2)]
    leaves = [_leaf(*s, seed=85 + i) for i, s in enumerate(shapes + shapes)]

    def fn(t1, t2, s1, s2):
        return tuple(reference.spatial_channel_loss([t1, t2], [s1, s2]))

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(
    "shape",
    [pytest.param((2, 3, 4, 4), id="C-below-N"), pytest.param((2, 5, 2, 2), id="N-below-C")],
)
def test_gradcheck_intra_affinity_loss(shape, distance):
    teacher, student = _leaf(*shape, seed=91), _leaf(*shape, seed=92)
    assert torch.autograd.gradcheck(
        lambda t, s: reference.intra_affinity_loss(t, s, distance=distance), (teacher, student)
    )


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck_inter_affinity_loss(distance):
    leaves = (
        _leaf(2, 3, 4, 4, seed=93),
        _leaf(2, 2, 2, 2, seed=94),
        _leaf(2, 3, 4, 4, seed=95),
        _leaf(2, 2, 2, 2, seed=96),
    )
    assert torch.autograd.gradcheck(
        lambda ta, tb, sa, sb: reference.inter_affinity_loss(ta, tb, sa, sb, distance=distance),
        leaves,
    )


def test_gradcheck_cram():
    embedding, centers = _leaf(2, 3, 2, 3, seed=97), _leaf(4, 3, seed=98)
    log_tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda e, c, lt: tuple(reference.cram(e, c, lt)), (embedding, centers, log_tau)
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_anomaly_map(mode):
    teachers = [randn(2, 3, 4, 4, seed=99), randn(2, 4, 2, 2, seed=100)]
    students = [
        (randn(2, 3, 4, 4, seed=101) + teachers[0]).requires_grad_(),
        (randn(2, 4, 2, 2, seed=102) + teachers[1]).requires_grad_(),
    ]
    assert torch.autograd.gradcheck(
        lambda s1, s2: reference.anomaly_map(teachers, [s1, s2], (6, 5), sigma=1.0, mode=mode).maps,
        tuple(students),
    )


# ----------------------------------------------------------------------------------------------
# Zero vectors in the affinity losses
# ----------------------------------------------------------------------------------------------


def _grads(fn, *inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("distance", DISTANCES)
def test_intra_affinity_loss_zero_pixels_finite_and_match_textbook(distance):
    teacher, student = randn(2, 3, 4, 4, seed=111), randn(2, 3, 4, 4, seed=112)
    teacher[0, :, 1, 1] = 0
    student[0, :, 1, 1] = 0  # zero pixel in both
    teacher[1, :, 2, 3] = 0  # teacher-only zero pixel: its affinities are 0 for T, not for S
    inputs = (teacher, student)
    got, got_g = _grads(lambda t, s: reference.intra_affinity_loss(t, s, distance), *inputs)
    want, want_g = _grads(lambda t, s: textbook_intra_affinity_loss(t, s, distance), *inputs)
    torch.testing.assert_close(got, want, **TOL[F64])
    for name, g, w in zip(("d teacher", "d student"), got_g, want_g, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9, msg=name)


@pytest.mark.parametrize("distance", DISTANCES)
def test_inter_affinity_loss_zero_channel_maps_finite_and_match_textbook(distance):
    ta, tb = randn(2, 3, 4, 4, seed=113), randn(2, 2, 2, 2, seed=114)
    sa, sb = randn(2, 3, 4, 4, seed=115), randn(2, 2, 2, 2, seed=116)
    ta[0, 1] = 0
    sa[0, 1] = 0  # zero channel map at level a, in both
    tb[1, 0] = 0  # teacher-only zero channel map at level b
    inputs = (ta, tb, sa, sb)
    got, got_g = _grads(lambda *x: reference.inter_affinity_loss(*x, distance=distance), *inputs)
    want, want_g = _grads(lambda *x: textbook_inter_affinity_loss(*x, distance), *inputs)
    torch.testing.assert_close(got, want, **TOL[F64])
    for name, g, w in zip(("ta", "tb", "sa", "sb"), got_g, want_g, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9, msg=name)


# ----------------------------------------------------------------------------------------------
# Low-precision inputs: float32 outputs, close to the float64 reference of the upcast inputs
# ----------------------------------------------------------------------------------------------

LOW_PRECISION_OPS = {
    "cosine_distances": (
        [(2, 5, 4, 3)] * 2,
        lambda t, s: tuple(reference.cosine_distances(t, s)),
    ),
    "spatial_channel_loss": (
        [(2, 4, 4, 4), (2, 6, 2, 2)] * 2,
        lambda t1, t2, s1, s2: tuple(reference.spatial_channel_loss([t1, t2], [s1, s2])),
    ),
    "intra_affinity_loss-l2": (
        [(2, 6, 4, 4)] * 2,
        lambda t, s: (reference.intra_affinity_loss(t, s, "l2"),),
    ),
    "intra_affinity_loss-l1": (
        [(2, 6, 4, 4)] * 2,
        lambda t, s: (reference.intra_affinity_loss(t, s, "l1"),),
    ),
    "inter_affinity_loss-l2": (
        [(2, 3, 4, 4), (2, 5, 2, 2)] * 2,
        lambda ta, tb, sa, sb: (reference.inter_affinity_loss(ta, tb, sa, sb, "l2"),),
    ),
    "inter_affinity_loss-l1": (
        [(2, 3, 4, 4), (2, 5, 2, 2)] * 2,
        lambda ta, tb, sa, sb: (reference.inter_affinity_loss(ta, tb, sa, sb, "l1"),),
    ),
    "cram": (
        [(2, 6, 3, 3), (4, 6)],
        lambda e, c: tuple(reference.cram(e, c, 0.25)),
    ),
    "anomaly_map": (
        [(2, 3, 4, 4), (2, 5, 2, 2)] * 2,
        lambda t1, t2, s1, s2: tuple(reference.anomaly_map([t1, t2], [s1, s2], (9, 7), 1.0)),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("op", list(LOW_PRECISION_OPS))
def test_low_precision_inputs_give_float32_close_to_float64(op, dtype):
    shapes, fn = LOW_PRECISION_OPS[op]
    low = [randn(*s, seed=120 + i).to(dtype) for i, s in enumerate(shapes)]
    got = fn(*low)
    want = fn(*[x.double() for x in low])  # exactly the same values, upcast
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == torch.float32, f"output {i}"
        assert w.dtype == F64, f"output {i}"
        torch.testing.assert_close(g.double(), w, **LOW_PRECISION_TOL, msg=f"output {i}")
