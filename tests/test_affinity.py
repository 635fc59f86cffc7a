"""intra_affinity_loss and inter_affinity_loss: kernels against the float64 reference.

Accuracy bar of the affinity issue, for fp32 inputs: relative error at most 1e-4 in the
loss and 1e-3 in each gradient (norm of the difference over the norm of the reference),
including a student within 1% of the teacher, where the plain Gram identity cancels.
On a CPU-only machine the Triton kernels run under the interpreter on small shapes; on a
GPU both kernel backends also run at the WRN50 shapes.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from support import (
    DEVICE,
    DTYPES,
    assert_fullgraph_compile_matches_eager,
    kernel_backends,
    requires_gpu,
)

import snl_kernels
from snl_kernels import precision, reference
from snl_kernels.precision import use_grams

LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
# Absolute floor of the norm-wise gradient error, for true gradients that are zero (one pixel,
# one channel), where only fp32 rounding is left: under 1e-6 under the interpreter, up to
# 4.1e-6 in the GPUs' summation orders (H200 round, 2026-11-30).
GRAD_ATOL = 1e-6 if DEVICE == "cpu" else 1e-5

# Intra shapes (B, C, H, W), each with the reason it is here. Tiles are 32 x 32 (rows) with
# 32-wide reductions; the C x C Gram form runs for l2 when C < N, the tiled form otherwise.
INTRA = {
    "grams-odd-sizes": (2, 20, 5, 7),
    # C < N: the Gram form with three tiles of channels (the last one partial), six pairs
    # of the upper triangle, each standing for itself and its mirror image.
    "grams-channels-span-tiles": (2, 70, 9, 9),
    "tiled-l2-c-above-n": (1, 40, 3, 3),
    "pixels-span-tiles": (1, 6, 7, 11),
    "channels-span-tiles": (2, 45, 2, 3),
    "one-pixel": (2, 5, 1, 1),
    "one-channel": (1, 1, 4, 5),
}
# Inter pairs ((B, C_a, H_a, W_a), (C_b, H_b, W_b)): divisible, uneven (overlapping) pooling
# bins, equal sizes, channel counts spanning tiles.
INTER = {
    "pool-2x2": ((2, 12, 8, 8), (20, 4, 4)),
    "uneven-bins": ((1, 10, 7, 5), (6, 3, 2)),
    "same-size": ((2, 8, 6, 6), (16, 6, 6)),
    "channels-span-tiles": ((1, 40, 4, 6), (35, 2, 3)),
    "to-one-pixel": ((2, 3, 3, 2), (4, 1, 1)),
}
WRN50 = [(16, 256, 64, 64), (16, 512, 32, 32), (16, 1024, 16, 16)]
# The inter-affinity gradients at WRN50 shapes are ~1e-8 per element (a mean over C_a x C_b
# affinities and every pixel), below float16's smallest subnormal (6e-8): unscaled, a float16
# gradient is all zeros in any implementation. Scaled by 2^20, as a GradScaler would.
WRN50_LOSS_SCALE = {torch.float32: 1.0, torch.float16: 2.0**20, torch.bfloat16: 1.0}


def _pair(shape, dtype=torch.float32, seed=0, noise=0.7, zero_pixel=False):
    """Teacher and student (B, C, H, W); the student is teacher * (1 + noise * N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    s = t * (1 + noise * torch.randn(shape, generator=g, dtype=torch.float64))
    if zero_pixel:
        t[0, :, 0, 0] = 0  # a zero vector: its norm is clamped
        s[-1, :, -1, -1] = 0
    return t.to(DEVICE, dtype), s.to(DEVICE, dtype)


def _check(fn, ref_fn, inputs, teacher_grad=True, loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL,
           loss_scale=1.0):
    """Loss and gradients of fn vs ref_fn in float64 on the same values.

    ``inputs`` lists (tensor, is_teacher); teachers require grad only with teacher_grad.
    ``loss_scale`` multiplies both losses (as mixed-precision training scales its loss), so
    that gradients stored in float16 are representable.
    """
    xs = [x.detach().clone().requires_grad_(teacher_grad or not is_t) for x, is_t in inputs]
    x64 = [x.detach().double().requires_grad_(True) for x, _ in inputs]
    loss = fn(*xs) * loss_scale
    ref = ref_fn(*x64) * loss_scale
    assert loss.dtype == torch.float32
    assert loss.shape == ()
    assert abs(loss.item() - ref.item()) <= loss_rtol * abs(ref.item()) + 1e-12, (
        loss.item(), ref.item())
    want = [x.requires_grad for x in xs]
    got = torch.autograd.grad(loss, [x for x in xs if x.requires_grad])
    ref_grads = torch.autograd.grad(ref, [x for x, w in zip(x64, want, strict=True) if w])
    for g, r, x in zip(got, ref_grads, [x for x in xs if x.requires_grad], strict=True):
        assert g.dtype == x.dtype
        assert g.shape == x.shape
        assert torch.isfinite(g).all()
        # Norm-wise, with the absolute floor GRAD_ATOL (scaled with the loss).
        err = (g.detach().double() - r.to(g.device)).norm().item()
        assert err <= grad_rtol * r.norm().item() + GRAD_ATOL * loss_scale, (
            err, r.norm().item())


def _intra(backend, distance):
    return (lambda t, s: snl_kernels.intra_affinity_loss(t, s, distance, backend=backend),
            lambda t, s: reference.intra_affinity_loss(t, s, distance))


def _inter(backend, distance):
    return (lambda *x: snl_kernels.inter_affinity_loss(*x, distance, backend=backend),
            lambda *x: reference.inter_affinity_loss(*x, distance))


def _inter_inputs(shapes, dtype=torch.float32, noise=0.7, seed=0):
    (B, C_a, H_a, W_a), (C_b, H_b, W_b) = shapes
    t_a, s_a = _pair((B, C_a, H_a, W_a), dtype, seed, noise)
    t_b, s_b = _pair((B, C_b, H_b, W_b), dtype, seed + 1, noise)
    return [(t_a, True), (t_b, True), (s_a, False), (s_b, False)]


# --------------------------------------------------------------------------- intra


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("shape", list(INTRA.values()), ids=list(INTRA))
def test_intra_matches_reference(backend, distance, shape):
    t, s = _pair(shape, zero_pixel=True)
    _check(*_intra(backend, distance), [(t, True), (s, False)])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("shape", [(2, 12, 6, 6), (1, 48, 4, 4)], ids=["grams", "tiled"])
def test_intra_student_close_to_teacher(backend, distance, shape):
    # student = teacher (1 + 1% noise): A_T - A_S is ~100x smaller than A; the plain
    # Gram identity loses the loss to cancellation here.
    t, s = _pair(shape, noise=0.01)
    assert use_grams(shape[1], shape[2] * shape[3], distance) == (shape[1] == 12
                                                                  and distance == "l2")
    _check(*_intra(backend, distance), [(t, True), (s, False)])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_intra_frozen_teacher_gets_no_gradient(backend, distance):
    t, s = _pair((2, 10, 4, 5))
    _check(*_intra(backend, distance), [(t, True), (s, False)], teacher_grad=False)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_intra_low_precision_inputs(backend, dtype):
    # The kernels accumulate in fp32 from the rounded inputs: judged against the float64
    # reference on the same rounded values, with the fp32 bar.
    # Gradients stored in fp16/bf16 carry that dtype's rounding on top.
    t, s = _pair((2, 20, 5, 7), dtype)
    for distance in ("l2", "l1"):
        _check(*_intra(backend, distance), [(t, True), (s, False)],
               grad_rtol=GRAD_RTOL + torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_intra_any_strides(backend, layout):
    t, s = _pair((2, 12, 8, 7))

    def view(x):
        if layout == "channels_last":
            return x.contiguous(memory_format=torch.channels_last)
        return x[:, 1::2, ::2, 1:]

    for distance in ("l2", "l1"):
        fn = _intra(backend, distance)[0]
        # Leaves of the same values: dense contiguous, and the strided view's base.
        tb, sb = (x.detach().clone().requires_grad_(True) for x in (t, s))
        tv, sv = view(tb), view(sb)
        ta, sa = (x.detach().contiguous().requires_grad_(True) for x in (tv, sv))
        assert not tv.is_contiguous()
        la, lb = fn(ta, sa), fn(tv, sv)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la, atol=0, rtol=1e-6)
        torch.testing.assert_close(view(sb.grad), sa.grad, atol=1e-9, rtol=1e-5)
        torch.testing.assert_close(view(tb.grad), ta.grad, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_intra_equal_features_give_zero(backend):
    t, _ = _pair((2, 8, 5, 5), zero_pixel=True)
    for distance in ("l2", "l1"):
        s = t.clone().requires_grad_(True)
        loss = snl_kernels.intra_affinity_loss(t, s, distance, backend=backend)
        loss.backward()
        assert torch.isfinite(s.grad).all()
        if DEVICE == "cpu":
            assert loss.item() == 0.0
            if distance == "l2":
                assert s.grad.abs().max().item() == 0.0
        else:
            # On a GPU, fp32 rounding in the tensor-core products leaves a little in the loss
            # (l2: -2.2e-16; l1, linear in it: 9.8e-9) and 1.5e-10 in the l2 gradient (H200
            # rounds, 2026-11-30); with a noisy student (noise 0.7) these features give
            # losses of 0.09 (l2) and 0.22 (l1) and gradients up to 0.01.
            assert abs(loss.item()) <= (1e-12 if distance == "l2" else 1e-6)
            if distance == "l2":
                assert s.grad.abs().max().item() <= 1e-8


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_intra_deterministic_bits(backend, distance):
    t, s = _pair((2, 20, 5, 7))
    runs = []
    for _ in range(2):
        ts, ss = (x.detach().clone().requires_grad_(True) for x in (t, s))
        loss = snl_kernels.intra_affinity_loss(ts, ss, distance, backend=backend)
        loss.backward()
        runs.append((loss, ts.grad, ss.grad))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- inter


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("shapes", list(INTER.values()), ids=list(INTER))
def test_inter_matches_reference(backend, distance, shapes):
    _check(*_inter(backend, distance), _inter_inputs(shapes))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_inter_student_close_to_teacher(backend, distance):
    _check(*_inter(backend, distance), _inter_inputs(INTER["pool-2x2"], noise=0.01))


@pytest.mark.parametrize("backend", kernel_backends())
def test_inter_frozen_teacher_and_low_precision(backend):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        inputs = _inter_inputs(INTER["uneven-bins"], dtype)
        rtol = GRAD_RTOL + (0 if dtype == torch.float32 else torch.finfo(dtype).eps)
        _check(*_inter(backend, "l2"), inputs, teacher_grad=False, grad_rtol=rtol)


@pytest.mark.parametrize("backend", kernel_backends())
def test_inter_any_strides_and_zero_channels(backend):
    inputs = _inter_inputs(((2, 6, 8, 8), (10, 4, 4)))
    t_a, t_b, s_a, s_b = (x for x, _ in inputs)
    t_b[0, 3] = 0  # a zero channel map: its norm is clamped
    s_a[0, 2] = 0  # with t_b's: Delta[0, 2, 3] is exactly 0 (sign 0 for l1)
    views = [t_a.contiguous(memory_format=torch.channels_last), t_b.transpose(2, 3).contiguous()
             .transpose(2, 3), s_a, s_b.contiguous(memory_format=torch.channels_last)]
    for distance in ("l2", "l1"):
        fn, ref_fn = _inter(backend, distance)
        got = fn(*views)
        torch.testing.assert_close(got, fn(t_a, t_b, s_a, s_b), atol=0, rtol=1e-6)
        _check(fn, ref_fn, [(v, k < 2) for k, v in enumerate(views)])


@pytest.mark.parametrize("backend", kernel_backends())
def test_inter_deterministic_bits(backend):
    inputs = _inter_inputs(INTER["uneven-bins"])
    runs = []
    for _ in range(2):
        xs = [x.detach().clone().requires_grad_(True) for x, _ in inputs]
        loss = snl_kernels.inter_affinity_loss(*xs, "l1", backend=backend)
        loss.backward()
        runs.append([loss, *(x.grad for x in xs)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- precision

@pytest.mark.parametrize("backend", kernel_backends())
def test_bad_dot_precision_is_named(monkeypatch, backend):
    monkeypatch.setenv("SNL_DOT_PRECISION", "fp64")
    t, s = _pair((1, 4, 2, 2))
    with pytest.raises(ValueError, match="SNL_DOT_PRECISION must be one of ieee, tf32x3, tf32, "
                                         "got 'fp64'"):
        snl_kernels.intra_affinity_loss(t, s, backend=backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_forced_precisions_keep_the_accuracy_bar(monkeypatch, backend, distance, precision):
    # The interpreter computes exactly what the tensor cores do: _dot rounds the operands
    # itself (and splits them for tf32x3), and its products of tf32 values are exact in fp32.
    # (CUDA runs tf32x3 as fp32 FMA.) The near-equal student is the hard case.
    monkeypatch.setenv("SNL_DOT_PRECISION", precision)
    for shape in [(2, 12, 6, 6), (1, 48, 4, 4)]:
        t, s = _pair(shape, noise=0.01)
        _check(*_intra(backend, distance), [(t, True), (s, False)])
    _check(*_inter(backend, distance), _inter_inputs(INTER["pool-2x2"], noise=0.01))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("noise", [0.7, 0.01])
@pytest.mark.parametrize("shape", [(1, 16, 16, 16), (1, 256, 16, 16)], ids=["grams", "tiled"])
def test_tf32_products_keep_the_l2_bar_from_256_pixels(monkeypatch, backend, shape, noise):
    # l2 from TF32_MIN_ROWS pixels runs one tf32 product per operand pair by default (CUDA:
    # WMMA on sm_80 and newer).
    from snl_kernels._triton import affinity

    monkeypatch.delenv("SNL_DOT_PRECISION", raising=False)
    assert shape[2] * shape[3] == precision.TF32_MIN_ROWS
    assert precision.dot_precision(False, precision.TF32_MIN_ROWS) == "tf32"
    # One channel block in the tiled backward: 8x fewer interpreted programs.
    monkeypatch.setattr(affinity, "MAX_BLOCK_C", 256)
    t, s = _pair(shape, noise=noise)
    _check(*_intra(backend, "l2"), [(t, True), (s, False)])
    # The rounding is real: full fp32 products give a different loss.
    monkeypatch.setenv("SNL_DOT_PRECISION", "ieee")
    ieee = snl_kernels.intra_affinity_loss(t, s, "l2", backend=backend).item()
    monkeypatch.delenv("SNL_DOT_PRECISION")
    tf32 = snl_kernels.intra_affinity_loss(t, s, "l2", backend=backend).item()
    assert abs(tf32 - ieee) > 1e-7 * abs(ieee)


@pytest.mark.parametrize("backend", kernel_backends())
def test_tf32_inter_keeps_the_l2_bar(monkeypatch, backend):
    # 256 channels on both sides: Triton's default for l2 (CUDA's inter-affinity is FMA).
    monkeypatch.delenv("SNL_DOT_PRECISION", raising=False)
    for noise in (0.7, 0.01):
        _check(*_inter(backend, "l2"), _inter_inputs(((1, 256, 8, 8), (256, 4, 4)), noise=noise))


def test_default_precision_by_distance_and_size(monkeypatch):
    from snl_kernels.precision import TF32_MIN_ROWS, dot_precision

    monkeypatch.delenv("SNL_DOT_PRECISION", raising=False)
    assert dot_precision(False, TF32_MIN_ROWS) == "tf32"
    assert dot_precision(False, TF32_MIN_ROWS - 1) == "tf32x3"
    assert dot_precision(True, 4096) == "tf32x3"  # l1: sign(Delta) needs ~fp32 products
    monkeypatch.setenv("SNL_DOT_PRECISION", "ieee")
    assert dot_precision(False, 4096) == "ieee"


def test_what_each_backend_runs_for_an_asked_precision():
    # The table of snl_kernels/precision.py: Triton runs every precision as asked; CUDA runs
    # the Gram path as asked (cuBLAS), tf32 WMMA for tiled intra l2 only (both tensor-core
    # precisions on sm_80 and newer), fp32 FMA ("ieee") for the rest.
    gpu = torch.device("cuda", 0) if torch.cuda.is_available() else None
    sm80 = gpu is not None and torch.cuda.get_device_capability(gpu)[0] >= 8
    cpu = torch.device("cpu")
    for asked in precision.PRECISIONS:
        for product in ("intra-l2-gram", "intra-l2", "intra-l1", "inter"):
            assert precision.for_backend("triton", product, asked) == asked
        assert precision.for_backend("cuda", "intra-l1", asked) == "ieee"
        assert precision.for_backend("cuda", "inter", asked) == "ieee"
        assert precision.for_backend("cuda", "intra-l2-gram", asked, cpu) == "ieee"
        with mock.patch.object(precision, "_has_tf32", return_value=True):  # an sm_90 GPU
            assert precision.for_backend("cuda", "intra-l2-gram", asked, gpu) == asked
        if gpu is not None:
            assert precision.for_backend("cuda", "intra-l2-gram", asked, gpu) == (
                asked if sm80 else "ieee")
    assert precision.for_backend("cuda", "intra-l2", "tf32x3", gpu) == "ieee"
    assert precision.for_backend("cuda", "intra-l2", "ieee", gpu) == "ieee"
    assert precision.for_backend("cuda", "intra-l2", "tf32", cpu) == "ieee"
    if gpu is not None:
        assert precision.for_backend("cuda", "intra-l2", "tf32", gpu) == (
            "tf32" if sm80 else "ieee")
    with pytest.raises(ValueError, match="precision must be one of ieee, tf32x3, tf32, got 'x'"):
        precision.for_backend("triton", "inter", "x")


def test_plan_of_a_call(monkeypatch):
    monkeypatch.delenv("SNL_DOT_PRECISION", raising=False)
    t = torch.zeros(1, 16, 16, 16)
    assert precision.intra_plan("triton", t, "l2") == (True, "tf32")
    assert precision.intra_plan("triton", t, "l1") == (False, "tf32x3")
    assert precision.intra_plan("cuda", t, "l1") == (False, "ieee")
    with mock.patch.object(precision, "_has_tf32", return_value=True):  # an sm_90 GPU
        assert precision.intra_plan("cuda", t, "l2") == (True, "tf32")
        assert precision.intra_plan("cuda", torch.zeros(1, 8, 4, 4), "l2") == (True, "tf32x3")
        assert precision.intra_plan("cuda", torch.zeros(1, 300, 16, 16), "l2") == (False, "tf32")
    assert precision.intra_plan("triton", torch.zeros(1, 300, 16, 16), "l2") == (False, "tf32")
    assert precision.inter_plan("triton", t, torch.zeros(1, 300, 8, 8), "l2") == "tf32x3"
    monkeypatch.setenv("SNL_DOT_PRECISION", "ieee")
    assert precision.intra_plan("triton", t, "l2") == (True, "ieee")


@pytest.mark.parametrize("backend", kernel_backends())
def test_ops_take_the_precision_given_not_the_environment(monkeypatch, backend):
    # The kernels read no environment: with SNL_DOT_PRECISION invalid, the ops still run at
    # the precision they are given (the public function, which reads it, refuses).
    ns = _namespace(backend)
    t, s = _pair((1, 6, 3, 3))
    want = ns.intra_affinity_fwd(t, s, "l2", False, "ieee")[0]
    monkeypatch.setenv("SNL_DOT_PRECISION", "fp64")
    got, signs = ns.intra_affinity_fwd(t, s, "l2", False, "ieee")[:2]
    assert torch.equal(got, want)
    assert signs.numel() == 0
    x = [x for x, _ in _inter_inputs(((1, 4, 4, 4), (6, 2, 2)))]
    out = ns.inter_affinity_fwd(*x, "l2", "ieee")  # (Triton's: the loss, saved tensors)
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out)
    with pytest.raises(ValueError, match="SNL_DOT_PRECISION must be one of"):
        snl_kernels.intra_affinity_loss(t, s, backend=backend)


# --------------------------------------------------------------------------- registration


def _namespace(backend):
    return {"triton": torch.ops.snl_triton, "cuda": getattr(torch.ops, "snl", None)}[backend]


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    ns = _namespace(backend)
    t, s = _pair((2, 6, 3, 4))
    g = torch.tensor(0.5, device=DEVICE)
    # (The interpreter is slow: each case once, not every combination.)
    torch.library.opcheck(ns.intra_affinity_fwd.default,
                          (t, s.clone().requires_grad_(True), "l1",
                           *precision.intra_plan(backend, t, "l1")))

    def bwd_args(t, s, distance, need_teacher):
        # The forward's signs (Triton l1: the signs of Delta; else empty) go to the backward.
        plan = precision.intra_plan(backend, t, distance)
        signs = ns.intra_affinity_fwd(t, s, distance, *plan)[1]
        return (t, s, g, signs, distance, *plan, need_teacher)

    for distance, need_teacher in (("l2", True), ("l1", False)):
        torch.library.opcheck(ns.intra_affinity_bwd.default, bwd_args(t, s, distance, need_teacher))
    # channels_last inputs: the fakes must give the real gradients' strides (contiguous).
    t_cl, s_cl = (v.contiguous(memory_format=torch.channels_last) for v in (t, s))
    torch.library.opcheck(ns.intra_affinity_bwd.default, bwd_args(t_cl, s_cl, "l1", True))
    x = [x for x, _ in _inter_inputs(((1, 4, 4, 4), (6, 2, 2)))]
    dot = precision.inter_plan(backend, x[0], x[1], "l2")
    torch.library.opcheck(ns.inter_affinity_fwd.default,
                          (x[0], x[1], x[2].requires_grad_(True), x[3].requires_grad_(True),
                           "l2", dot))
    torch.library.opcheck(ns.inter_affinity_bwd.default,
                          (*(v.detach() for v in x), g, "l1", dot, True))
    x_cl = [v.detach().contiguous(memory_format=torch.channels_last) for v in x]
    torch.library.opcheck(ns.inter_affinity_bwd.default, (*x_cl, g, "l2", dot, False))


@pytest.mark.parametrize("backend", kernel_backends())
def test_traces_fullgraph_with_aot_autograd(backend):
    # Dynamo and AOTAutograd through the fake implementations and registered autograd,
    # on any device (Inductor itself is the GPU test below).
    torch._dynamo.reset()

    def loss(t, s, t2, s2):
        return (snl_kernels.intra_affinity_loss(t, s, "l1", backend=backend)
                + snl_kernels.inter_affinity_loss(t, t2, s, s2, "l2", backend=backend))

    t, s = _pair((1, 6, 4, 4))
    t2, s2 = _pair((1, 8, 2, 2), seed=1)
    s.requires_grad_(True)
    s2.requires_grad_(True)
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(t, s, t2, s2)
    grads = torch.autograd.grad(got, (s, s2))
    want = loss(t, s, t2, s2)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, torch.autograd.grad(want, (s, s2)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64_is_refused_by_kernels(backend):
    t, s = _pair((1, 3, 2, 2), torch.float64)
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match="float64 inputs run on the reference only"):
        snl_kernels.intra_affinity_loss(t, s, backend=backend)
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match="float64 inputs run on the reference only"):
        snl_kernels.inter_affinity_loss(t, t, s, s, backend=backend)


def test_float64_uses_the_reference_in_automatic_mode():
    t, s = _pair((1, 3, 2, 2), torch.float64)
    assert snl_kernels.intra_affinity_loss(t, s).dtype == torch.float64
    assert snl_kernels.inter_affinity_loss(t, t, s, s).dtype == torch.float64


# --------------------------------------------------------------------------- GPU


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("shape", WRN50, ids=["level1", "level2", "level3"])
def test_intra_wrn50_shapes_on_gpu(backend, distance, shape):
    for noise in (0.7, 0.01):
        t, s = _pair(shape, noise=noise)
        _check(*_intra(backend, distance), [(t, True), (s, False)], teacher_grad=False)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inter_wrn50_pairs_on_gpu(backend, dtype):
    for k in range(2):
        (B, C_a, H_a, W_a), (_, C_b, H_b, W_b) = WRN50[k], WRN50[k + 1]
        for noise in (0.7, 0.01):
            inputs = _inter_inputs(((B, C_a, H_a, W_a), (C_b, H_b, W_b)), dtype, noise)
            for distance in ("l2", "l1"):
                _check(*_inter(backend, distance), inputs, teacher_grad=False,
                       loss_scale=WRN50_LOSS_SCALE[dtype])


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_compiles_fullgraph_on_gpu(backend):
    torch._dynamo.reset()

    def loss(teachers, students):
        intra = sum(snl_kernels.intra_affinity_loss(t, s, "l1", backend=backend)
                    for t, s in zip(teachers, students, strict=True))
        inter = snl_kernels.inter_affinity_loss(teachers[0], teachers[1], students[0],
                                                students[1], "l2", backend=backend)
        return intra + inter

    teachers, students = [], []
    for k, shape in enumerate([(4, 64, 16, 16), (4, 128, 8, 8)]):
        t, s = _pair(shape, seed=k)
        teachers.append(t)
        students.append(s.requires_grad_(True))
    assert_fullgraph_compile_matches_eager(loss, teachers, students)
