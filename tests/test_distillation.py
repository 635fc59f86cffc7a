"""snl_distillation_loss: the shared Triton path against the separate ops (and float64)."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, NO_TRITON

import snl_kernels
from snl_kernels import distillation

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

# Three levels, fine to coarse: Gram form at the first (C < N), Delta tiles at the others.
SHAPES = [(2, 8, 6, 6), (2, 12, 3, 3), (2, 16, 2, 2)]


def _levels(shapes=SHAPES, dtype=torch.float32, seed=0, teacher_grad=False, zero_pixel=False):
    g = torch.Generator().manual_seed(seed)
    teachers, students = [], []
    for shape in shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        s = t + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        if zero_pixel:
            t[0, :, 0, 0] = 0
            s[0, :, 0, 0] = 0
            s[1, :, 1, 1] = 0
        teachers.append(t.to(DEVICE, dtype).requires_grad_(teacher_grad))
        students.append(s.to(DEVICE, dtype).requires_grad_(True))
    return teachers, students


def _run(fn, teachers, students, weights):
    terms = fn(teachers, students)
    loss = sum(weights[name] * value for name, value in terms.items())
    inputs = [x for x in (*teachers, *students) if x.requires_grad]
    return terms, torch.autograd.grad(loss, inputs)


WEIGHTS = {"rd": 1.0, "channel": 0.7, "spatial": 0.5, "intra": 3.0, "inter": 2.0}


@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_shared_path_equals_separate_ops(distance, teacher_grad):
    teachers, students = _levels(teacher_grad=teacher_grad, zero_pixel=True)

    def shared(t, s):
        return snl_kernels.snl_distillation_loss(t, s, intra_distance=distance,
                                                 inter_distance=distance, backend="triton")

    def separate(t, s):
        return distillation._separate(t, s, distillation.TERMS, distance, distance, "triton")

    got, got_grads = _run(shared, teachers, students, WEIGHTS)
    want, want_grads = _run(separate, teachers, students, WEIGHTS)
    assert list(got) == list(distillation.TERMS)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    for g, w in zip(got_grads, want_grads, strict=True):
        scale = w.abs().max().item()
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=1e-5)


def test_shared_path_against_float64_reference():
    teachers, students = _levels()
    got, got_grads = _run(lambda t, s: snl_kernels.snl_distillation_loss(t, s, backend="triton"),
                          teachers, students, WEIGHTS)
    t64 = [t.detach().double() for t in teachers]
    s64 = [s.detach().double().requires_grad_(True) for s in students]
    want, want_grads = _run(lambda t, s: snl_kernels.snl_distillation_loss(t, s,
                                                                           backend="torch"),
                            t64, s64, WEIGHTS)
    for name in got:
        assert abs(got[name].item() - want[name].item()) <= 1e-4 * abs(want[name].item())
    for g, w in zip(got_grads, want_grads, strict=True):
        err = (g.double() - w.to(g.device)).norm() / w.norm()
        assert err.item() <= 1e-3


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "teacher-too"])
def test_gram_level_over_several_tiles_uses_the_forwards_grams(teacher_grad, monkeypatch):
    """A Gram-path level of 40 channels (two 32-channel tiles: the loss kernel writes the
    tile pair (0, 1) and its mirror (1, 0) of every Gram): the gradients come from the Grams
    the forward stored, no kernel forms them again, and they match float64."""
    from snl_kernels._triton import affinity

    shapes = [(2, 40, 7, 7), (2, 48, 4, 4)]
    teachers, students = _levels(shapes, teacher_grad=teacher_grad)
    stores = []
    real = affinity.gram_loss

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        stores.append(len(out[1] or ()))
        return out

    monkeypatch.setattr(affinity, "gram_loss", recording)
    got, got_grads = _run(lambda t, s: snl_kernels.snl_distillation_loss(t, s, backend="triton"),
                          teachers, students, WEIGHTS)
    assert stores == [4 if teacher_grad else 2]  # one Gram-path level, one loss launch
    with torch.no_grad():  # no gradient will come: no Gram is written
        snl_kernels.snl_distillation_loss(teachers, students, backend="triton")
    assert stores[-1] == 0
    x64 = [x.detach().double().requires_grad_(x.requires_grad) for x in (*teachers, *students)]
    want, want_grads = _run(lambda t, s: snl_kernels.snl_distillation_loss(t, s, backend="torch"),
                            x64[:2], x64[2:], WEIGHTS)
    for name in got:
        assert abs(got[name].item() - want[name].item()) <= 1e-4 * abs(want[name].item())
    for g, w in zip(got_grads, want_grads, strict=True):
        err = (g.double() - w.to(g.device)).norm() / w.norm()
        assert err.item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    teachers, students = _levels(dtype=dtype)
    got, grads = _run(lambda t, s: snl_kernels.snl_distillation_loss(t, s, backend="triton"),
                      teachers, students, WEIGHTS)
    want, _ = _run(lambda t, s: distillation._separate(t, s, distillation.TERMS, "l2", "l2",
                                                       "triton"), teachers, students, WEIGHTS)
    for name in got:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    for g, s in zip(grads, students, strict=True):
        assert g.dtype == dtype
        assert g.shape == s.shape
        assert torch.isfinite(g).all()


def test_subsets_of_terms_and_paths():
    teachers, students = _levels()
    only = snl_kernels.snl_distillation_loss(teachers, students, ["inter", "rd"],
                                             backend="triton")
    assert list(only) == ["inter", "rd"]
    full = snl_kernels.snl_distillation_loss(teachers, students, backend="triton")
    for name, value in only.items():
        torch.testing.assert_close(value, full[name])
    # The reference path composes the reference ops.
    ref = snl_kernels.snl_distillation_loss(teachers, students, backend="torch")
    for name, value in ref.items():
        torch.testing.assert_close(value, full[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("term", ["rd", "channel", "spatial"])
def test_one_cosine_term_in_the_loss(term):
    """The loss takes one cosine term of the three the kernels form: the others' gradients
    are None (zeros in the backward kernel), and the term's gradients equal the separate
    ops'. The terms are tensors of their own: a caller may add into one in place."""
    teachers, students = _levels(teacher_grad=True, zero_pixel=True)
    inputs = [*teachers, *students]
    got = snl_kernels.snl_distillation_loss(teachers, students, backend="triton")
    want = distillation._separate(teachers, students, distillation.TERMS, "l2", "l2", "triton")
    got_grads = torch.autograd.grad(got[term], inputs)
    want_grads = torch.autograd.grad(want[term], inputs)
    for g, w in zip(got_grads, want_grads, strict=True):
        scale = w.abs().max().item()
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=1e-5)
    before = got["channel"].detach().clone()
    got[term] += 1.0
    assert got["channel"].item() == pytest.approx(before.item() + (term == "channel"))


def test_shared_path_is_taken_only_in_plain_eager_triton(monkeypatch):
    teachers, students = _levels()
    taken = []
    real = distillation._apply_shared
    monkeypatch.setattr(distillation, "_apply_shared", lambda *a: taken.append(1) or real(*a))
    snl_kernels.snl_distillation_loss(teachers, students, backend="triton")
    assert taken == [1]
    snl_kernels.snl_distillation_loss(teachers, students, backend="torch")
    monkeypatch.setenv("SNL_BACKEND", "triton")
    snl_kernels.snl_distillation_loss(teachers, students)
    assert taken == [1, 1]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:  # the registered op (tests/test_distillation_op.py)
        ft = [fake.from_tensor(t) for t in teachers]
        fs = [fake.from_tensor(s) for s in students]
        out = snl_kernels.snl_distillation_loss(ft, fs, backend="triton")
        assert out["rd"].shape == ()
    assert taken == [1, 1]


def test_spatial_channel_loss_on_triton_takes_the_shared_path(monkeypatch):
    """Plain eager on Triton: the fused loss's three cosine terms (equal to the separate
    ops' to float rounding, gradients too); under fake tensors: the fused loss's registered
    op, not the plain-eager Function."""
    teachers, students = _levels(teacher_grad=True, zero_pixel=True)
    taken = []
    real = distillation._apply_shared
    monkeypatch.setattr(distillation, "_apply_shared", lambda *a: taken.append(1) or real(*a))
    got = snl_kernels.spatial_channel_loss(teachers, students, backend="triton")
    assert taken == [1]
    from snl_kernels.cosine_distances import separate_means

    separate = separate_means(teachers, students, "triton")
    assert taken == [1]
    inputs = [*teachers, *students]
    got_grads = torch.autograd.grad(sum(got), inputs)
    want_grads = torch.autograd.grad(sum(separate), inputs)
    for a, b in zip(got, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        out = snl_kernels.spatial_channel_loss([fake.from_tensor(t) for t in teachers],
                                               [fake.from_tensor(s) for s in students],
                                               backend="triton")
        assert out.sample_mean.shape == ()
    assert taken == [1]


def test_errors_name_the_argument():
    teachers, students = _levels()
    with pytest.raises(ValueError, match="terms must be a non-empty subset"):
        snl_kernels.snl_distillation_loss(teachers, students, ["rd", "bogus"])
    with pytest.raises(ValueError, match="intra_distance"):
        snl_kernels.snl_distillation_loss(teachers, students, intra_distance="l3")
    with pytest.raises(ValueError, match="at least two levels"):
        snl_kernels.snl_distillation_loss(teachers[:1], students[:1], ["inter"])
    with pytest.raises(ValueError, match=r"teachers\[1\] and students\[1\]"):
        snl_kernels.snl_distillation_loss(teachers, [students[0], students[2], students[1]])


def test_pooling_with_norms_equals_pool_then_norms():
    from snl_kernels._triton import affinity as ka

    g = torch.Generator().manual_seed(4)
    shapes = [(2, 40, 7, 9), (2, 8, 6, 6), (2, 5, 4, 4), (2, 3, 5, 3), (2, 33, 8, 8)]
    sizes = [(3, 4), (3, 3), (2, 2), (5, 3), (1, 1)]  # uneven bins, identity, one bin
    tensors = [torch.randn(shape, generator=g).to(DEVICE) for shape in shapes]
    tensors[1][0, 2] = 0  # a zero channel: negative inverse norm
    tensors[2] = tensors[2].half()
    tensors[3] = tensors[3].contiguous(memory_format=torch.channels_last)
    got = ka.pool_with_norms(tensors, sizes, distillation.EPS)  # two launches (4 + 1)
    for (pooled, r), f, size in zip(got, tensors, sizes, strict=True):
        want = ka.pool(f, size)
        assert torch.equal(pooled, want)
        torch.testing.assert_close(r, ka.inv_norms(want, False, distillation.EPS),
                                   rtol=1e-6, atol=0)
    assert got[1][1][0, 2] < 0


def test_grouped_norm_backward_equals_one_launch_each():
    from snl_kernels._triton import affinity as ka

    g = torch.Generator().manual_seed(5)
    jobs, singles = [], []
    shapes = [(2, 6, 5, 4), (2, 9, 3, 3), (2, 4, 2, 6)] * 3  # nine jobs: two launches
    for i, shape in enumerate(shapes):
        f = torch.randn(shape, generator=g).to(DEVICE)
        pix_rows = i % 2 == 0
        if i == 4:
            f[0, :, 1, 1] = 0  # a zero pixel
        r = ka.inv_norms(f, pix_rows, distillation.EPS)
        gx = torch.randn(shape, generator=g).to(DEVICE)
        out = None if i % 3 else torch.empty_like(f)
        jobs.append((f, r, gx.clone(), pix_rows, out))
        singles.append(ka.norm_backward(f, r, gx.clone(), pix_rows, distillation.EPS,
                                        None if out is None else torch.empty_like(f)))
    for got, want in zip(ka.norm_backward_group(jobs, distillation.EPS), singles, strict=True):
        assert torch.equal(got, want)


def test_grouped_products_and_unpooling_equal_one_launch_each():
    from snl_kernels._triton import affinity as ka

    g = torch.Generator().manual_seed(6)
    jobs = []
    for m, c, h, w, prec in ((5, 7, 3, 4, "ieee"), (20, 6, 2, 2, "tf32x3"), (9, 9, 4, 1, "tf32"),
                             (3, 12, 5, 5, "ieee"), (8, 4, 2, 3, "tf32x3")):  # two launches
        gm = torch.randn(2, c, m, generator=g).to(DEVICE).transpose(1, 2)  # strided, as G^T
        y = torch.randn(2, c, h, w, generator=g).to(DEVICE)
        jobs.append((gm, y, ka.inv_norms(y, False, distillation.EPS), -0.5, prec))
    for got, job in zip(ka.scaled_mm_group(jobs), jobs, strict=True):
        assert torch.equal(got, ka.scaled_mm(*job))
    pairs = []
    for (b, c, h, w), (ho, wo) in (((2, 3, 7, 5), (3, 2)), ((2, 4, 6, 6), (3, 3)),
                                   ((2, 2, 4, 4), (4, 4))):  # three: two launches
        pairs.append((torch.randn(b, c, ho, wo, generator=g).to(DEVICE),
                      torch.randn(b, c, h, w, generator=g).to(DEVICE).half()))
    for got, (grad, like) in zip(ka.unpool_group(pairs), pairs, strict=True):
        assert got.dtype == like.dtype
        assert torch.equal(got, ka.unpool(grad, like))


def test_norm_backward_and_unpooling_add_into_a_given_gradient():
    from snl_kernels._triton import affinity as ka

    eps = distillation.EPS
    g = torch.Generator().manual_seed(8)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    f, h = randn(2, 5, 3, 4), randn(2, 5, 3, 4, dtype=torch.float16)
    r_f, r_h = ka.inv_norms(f, True, eps), ka.inv_norms(h, False, eps)
    gx = [randn(2, 5, 3, 4) for _ in range(3)]
    acc, acc_h = randn(2, 5, 3, 4), randn(2, 5, 3, 4, dtype=torch.float16)
    want = acc.clone()
    for x in gx[:2]:
        want += ka.norm_backward(f, r_f, x.clone(), True, eps)
    want_h = (acc_h.float() + ka.norm_backward(h, r_h, gx[2].clone(), False, eps).float())
    # The second job adds to the first's result: it runs in a later launch, after it.
    got = ka.norm_backward_group([(f, r_f, gx[0], True, None, acc),
                                  (f, r_f, gx[1], True, None, acc),
                                  (h, r_h, gx[2], False, None, acc_h)], eps)
    assert got[0] is acc
    assert got[1] is acc
    assert got[2] is acc_h
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc_h.float(), want_h, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="acc must have f's shape"):
        ka.norm_backward_group([(f, r_f, gx[0], True, None, acc[:1])], eps)
    # Unpooling into a gradient of any layout, and into a new tensor.
    like = randn(2, 3, 5, 4)
    pooled = randn(2, 3, 2, 2)
    into = randn(2, 5, 4, 3).permute(0, 3, 1, 2)  # (2, 3, 5, 4), channels last
    want = into + ka.unpool(pooled, like)
    got = ka.unpool_group([(pooled, like, into), (pooled, like, None)])
    assert got[0] is into
    torch.testing.assert_close(into, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], ka.unpool(pooled, like))
    with pytest.raises(ValueError, match="acc must have the shape"):
        ka.unpool_group([(pooled, like, into.half())])


def test_grouped_deltas_equal_one_launch_each():
    from snl_kernels._triton import affinity as ka

    eps = distillation.EPS
    g = torch.Generator().manual_seed(7)

    def pair(shape):
        t = torch.randn(shape, generator=g).to(DEVICE)
        return t, t + 0.3 * torch.randn(shape, generator=g).to(DEVICE)

    jobs = []
    for shape, l1 in (((2, 6, 5, 5), True), ((2, 9, 3, 4), False)):  # intra: symmetric
        t, s = pair(shape)
        r_t, r_s = ka.inv_norms(t, True, eps), ka.inv_norms(s, True, eps)
        n = shape[2] * shape[3]
        signs = torch.zeros((2, n, -(-n // 32)), dtype=torch.int32, device=DEVICE)
        jobs.append(dict(a_s=s, a_t=t, b_s=s, b_t=t, r_as=r_s, r_at=r_t, r_bs=r_s, r_bt=r_t,
                         pix_rows=True, l1=l1, precision="tf32x3", signs=signs if l1 else None))
    for l1, grad in ((False, None), (True, (torch.ones(1, device=DEVICE), 0.25)),
                     (False, (torch.ones(1, device=DEVICE), 0.5))):  # inter, and gradients
        (ta, sa), (tb, sb) = pair((2, 7, 3, 3)), pair((2, 11, 3, 3))
        norms = [ka.inv_norms(x, False, eps) for x in (sa, ta, sb, tb)]
        jobs.append(dict(a_s=sa, a_t=ta, b_s=sb, b_t=tb, r_as=norms[0], r_at=norms[1],
                         r_bs=norms[2], r_bt=norms[3], pix_rows=False, l1=l1,
                         precision="ieee", grad=grad))
    singles = []
    for job in jobs:
        job_copy = dict(job)
        if job.get("signs") is not None:
            job_copy["signs"] = torch.zeros_like(job["signs"])
        singles.append((ka.delta(**job_copy), job_copy.get("signs")))
    for got, job, (want, want_signs) in zip(ka.delta_group(jobs), jobs, singles, strict=True):
        assert torch.equal(got, want)
        if want_signs is not None:
            assert torch.equal(job["signs"], want_signs)


def test_grouped_tiled_gradients_equal_one_launch_each():
    from snl_kernels._triton import affinity as ka

    eps = distillation.EPS
    g = torch.Generator().manual_seed(8)
    jobs = []
    for shape, l1, teacher in (((2, 6, 5, 5), True, True), ((2, 9, 3, 4), False, False),
                               ((2, 5, 2, 3), False, True), ((2, 4, 4, 4), True, False)):
        t = torch.randn(shape, generator=g).to(DEVICE)
        s = t + 0.3 * torch.randn(shape, generator=g).to(DEVICE)
        r_t, r_s = ka.inv_norms(t, True, eps), ka.inv_norms(s, True, eps)
        n = shape[2] * shape[3]
        signs = None
        if l1:
            signs = torch.zeros((2, n, -(-n // 32)), dtype=torch.int32, device=DEVICE)
            ka.delta(s, t, s, t, r_s, r_t, r_s, r_t, pix_rows=True, l1=True,
                     precision="tf32x3", signs=signs)
        jobs.append(dict(s=s, t=t, r_s=r_s, r_t=r_t, grad_loss=torch.ones(1, device=DEVICE),
                         coef=0.5, l1=l1, teacher=teacher, precision="tf32x3", signs=signs))
    for (g_s, g_t), job in zip(ka.intra_tiled_grad_group(jobs), jobs, strict=True):  # 3 + 1
        want_s, want_t = ka.intra_tiled_grad(**job)
        assert torch.equal(g_s, want_s)
        assert (g_t is None) == (want_t is None)
        if g_t is not None:
            assert torch.equal(g_t, want_t)


@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_a_replayed_step_equals_the_step_as_written(distance, teacher_grad, monkeypatch):
    # The host code runs once per key, recorded; later calls replay the recording. Replayed
    # forward and backward give bit for bit what the host code as written gives.
    from snl_kernels import _replay

    def step(seed):
        teachers, students = _levels(teacher_grad=teacher_grad, zero_pixel=True, seed=seed)
        return _run(lambda t, s: snl_kernels.snl_distillation_loss(
            t, s, intra_distance=distance, inter_distance=distance, backend="triton"),
            teachers, students, WEIGHTS)

    distillation._FORWARD.clear()
    distillation._BACKWARD.clear()
    step(0)  # recorded
    assert len(distillation._FORWARD) == len(distillation._BACKWARD) == 1
    replayed, replayed_grads = step(1)
    assert len(distillation._FORWARD) == len(distillation._BACKWARD) == 1
    monkeypatch.setenv(_replay.ENV_VAR, "0")
    written, written_grads = step(1)
    for name in written:
        assert torch.equal(replayed[name], written[name]), name
    for got, want in zip(replayed_grads, written_grads, strict=True):
        assert torch.equal(got, want)
    assert distillation._FORWARD.name not in _replay.reasons()


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_the_replay_key_holds_what_the_host_code_decides_from(distance, monkeypatch):
    # SNL_REPLAY=check records every call again and raises where two calls with one key
    # record different programs: calls that differ in what the key holds (dtype, gradient
    # needs, grad mode, zero rows, precision setting, terms), each made twice
    from snl_kernels import _replay

    monkeypatch.setenv(_replay.ENV_VAR, "check")
    distillation._FORWARD.clear()
    distillation._BACKWARD.clear()
    cases = [dict(), dict(teacher_grad=True), dict(zero_pixel=True), dict(dtype=torch.float16),
             dict(seed=3)]
    for case in cases * 2:
        teachers, students = _levels(**case)
        _run(lambda t, s: snl_kernels.snl_distillation_loss(
            t, s, intra_distance=distance, inter_distance=distance, backend="triton"),
            teachers, students, WEIGHTS)
    with torch.no_grad():
        snl_kernels.snl_distillation_loss(teachers, students, terms=("rd", "inter"),
                                          intra_distance=distance, inter_distance=distance,
                                          backend="triton")
    monkeypatch.setenv("SNL_DOT_PRECISION", "ieee")
    _run(lambda t, s: snl_kernels.snl_distillation_loss(
        t, s, intra_distance=distance, inter_distance=distance, backend="triton"),
        teachers, students, WEIGHTS)
    # one program per key: fp32 (seeds and zero rows share it), fp32 with teacher
    # gradients, fp16, the no-grad subset, the ieee setting
    assert len(distillation._FORWARD) == 5
    assert distillation._FORWARD.name not in _replay.reasons()
