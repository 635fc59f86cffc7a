"""cosine_distances and spatial_channel_loss: kernels against the float64 reference.

On a CPU-only machine the Triton kernels run under the interpreter (small shapes); on a
GPU both kernel backends run, also at the WRN50 shapes of DESIGN §3.
"""

from __future__ import annotations

import pytest
import torch
from support import (
    DTYPES,
    assert_fullgraph_compile_matches_eager,
    assert_matches_oracle,
    features,
    kernel_backends,
    oracle_inputs,
    requires_gpu,
)

import snl_kernels
from snl_kernels import reference

# Adversarial shapes (STYLE.md) with the reason each is here. BLOCK_N = 64, BLOCK_C = 32.
SHAPES = {
    "one-element": (1, 1, 1, 1),
    "odd-7x5": (2, 3, 7, 5),
    "channels-span-blocks": (2, 70, 4, 4),
    "pixels-one-past-block": (2, 5, 65, 1),
    "batch1-wide": (1, 33, 3, 31),
}
WRN50 = {"level1": (16, 256, 64, 64), "level2": (16, 512, 32, 32), "level3": (16, 1024, 16, 16)}


def _weighted(out, weights):
    return sum((o * w).sum() for o, w in zip(out, weights, strict=True))


def _check_against_oracle(backend, t, s, weights=None, need_teacher=True):
    """Values and gradients of `backend` vs the float64 reference on the same inputs."""
    out = snl_kernels.cosine_distances(t, s, backend=backend)
    t64, s64 = oracle_inputs(t, s)
    ref = reference.cosine_distances(t64, s64)
    lowp = None
    if t.dtype != torch.float32:
        t_lp, s_lp = (x.detach().clone().requires_grad_(True) for x in (t, s))
        lowp_out = reference.cosine_distances(t_lp, s_lp)
    for name in ("pixel", "channel", "sample"):
        a, r = getattr(out, name), getattr(ref, name)
        assert a.dtype == torch.float32, name
        assert a.shape == r.shape, name
        assert_matches_oracle(a, r)
    if weights is None:
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    inputs = (t, s) if need_teacher else (s,)
    grads = torch.autograd.grad(_weighted(out, [w.float().to(t.device) for w in weights]), inputs)
    ref_grads = torch.autograd.grad(_weighted(ref, [w.to(t.device) for w in weights]),
                                    (t64, s64) if need_teacher else (s64,))
    if t.dtype != torch.float32:
        lp_inputs = (t_lp, s_lp) if need_teacher else (s_lp,)
        lowp = torch.autograd.grad(
            _weighted(lowp_out, [w.float().to(t.device) for w in weights]), lp_inputs)
    for k, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
        assert grad.dtype == t.dtype
        assert grad.shape == t.shape
        # Exactly-zero true gradients (C = 1) leave fp32 rounding: floor the scale.
        scale = max(ref_grad.abs().max().item(), 0.1)
        assert_matches_oracle(grad / scale, ref_grad / scale,
                              None if lowp is None else lowp[k] / scale, atol=2e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(backend, shape):
    t, s = features(shape, requires_grad=True)
    _check_against_oracle(backend, t, s)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_inputs(backend, dtype):
    t, s = features((2, 40, 5, 13), dtype=dtype, requires_grad=True)
    _check_against_oracle(backend, t, s)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("which", ["pixel", "channel", "sample"])
def test_gradient_of_one_output(backend, which):
    """Upstream gradient on a subset of outputs; frozen teacher gets no gradient."""
    t, s = features((2, 6, 5, 7), requires_grad=False)
    s.requires_grad_(True)
    out = snl_kernels.cosine_distances(t, s, backend=backend)
    getattr(out, which).mean().backward()
    s64 = s.detach().double().requires_grad_(True)
    getattr(reference.cosine_distances(t.double(), s64), which).mean().backward()
    assert t.grad is None
    assert_matches_oracle(s.grad / s64.grad.abs().max(), s64.grad / s64.grad.abs().max())


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed-hw"])
def test_any_strides(backend, layout):
    t, s = features((2, 9, 6, 10))
    if layout == "channels_last":
        tv, sv = (x.contiguous(memory_format=torch.channels_last) for x in (t, s))
    elif layout == "sliced":
        big_t, big_s = features((3, 12, 9, 14), seed=3)
        tv, sv = big_t[1:, 2:11, 1:7, 3:13], big_s[1:, 2:11, 1:7, 3:13]
        t, s = tv.contiguous(), sv.contiguous()
    else:
        tv, sv = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (t, s))
    assert not tv.is_contiguous()
    tv.requires_grad_(True)
    sv.requires_grad_(True)
    out_v = snl_kernels.cosine_distances(tv, sv, backend=backend)
    out_c = snl_kernels.cosine_distances(t.detach(), s.detach(), backend=backend)
    for a, b in zip(out_v, out_c, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    sum(o.sum() for o in out_v).backward()
    t64, s64 = oracle_inputs(t, s)
    sum(o.sum() for o in reference.cosine_distances(t64, s64)).backward()
    torch.testing.assert_close(sv.grad.double(), s64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tv.grad.double(), t64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_zero_vectors_are_finite_and_match_reference(backend):
    t, s = features((2, 4, 3, 5))
    t[0, :, 1, 2] = 0  # a zero teacher pixel
    s[1, :, 0, 0] = 0  # a zero student pixel
    s[0, 3] = 0  # a zero student channel map
    t, s = t.requires_grad_(True), s.requires_grad_(True)
    out = snl_kernels.cosine_distances(t, s, backend=backend)
    assert all(torch.isfinite(o).all() for o in out)
    assert out.pixel[0, 1, 2].item() == 1.0
    assert out.channel[0, 3].item() == 1.0
    _check_against_oracle(backend, t, s)


@pytest.mark.parametrize("backend", kernel_backends())
def test_deterministic_bits(backend):
    t, s = features((3, 40, 9, 11), requires_grad=True)
    runs = []
    for _ in range(3):
        out = snl_kernels.cosine_distances(t, s, backend=backend)
        grads = torch.autograd.grad(sum(o.sum() for o in out), (t, s))
        runs.append([*out, *grads])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_backends())
def test_spatial_channel_loss_matches_reference(backend):
    shapes = [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]
    pairs = [features(sh, seed=k, requires_grad=True) for k, sh in enumerate(shapes)]
    teachers, students = [p[0] for p in pairs], [p[1] for p in pairs]
    got = snl_kernels.spatial_channel_loss(teachers, students, backend=backend)
    ref64 = [oracle_inputs(t, s) for t, s in pairs]
    want = reference.spatial_channel_loss([p[0] for p in ref64], [p[1] for p in ref64])
    for a, b in zip(got, want, strict=True):
        assert_matches_oracle(a, b)
    sum(got).backward()
    sum(want).backward()
    for (t, s), (t64, s64) in zip(pairs, ref64, strict=True):
        assert_matches_oracle(s.grad, s64.grad, atol=1e-6)
        assert_matches_oracle(t.grad, t64.grad, atol=1e-6)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    ns = {"triton": torch.ops.snl_triton, "cuda": getattr(torch.ops, "snl", None)}[backend]
    t, s = features((2, 5, 3, 4), requires_grad=True)
    torch.library.opcheck(ns.cosine_distances_fwd.default, (t, s))
    fwd = ns.cosine_distances_fwd(t.detach(), s.detach())
    g = [torch.randn_like(fwd[0]), torch.randn_like(fwd[1]), torch.randn_like(fwd[2])]
    for need_teacher in (True, False):
        torch.library.opcheck(ns.cosine_distances_bwd.default,
                              (t.detach(), s.detach(), fwd[3], fwd[4], *g, need_teacher))


def test_float64_uses_the_reference_in_automatic_mode():
    t, s = features((1, 3, 2, 2), dtype=torch.float64)
    out = snl_kernels.cosine_distances(t, s)
    assert out.pixel.dtype == torch.float64


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64_is_refused_by_kernels(backend):
    t, s = features((1, 3, 2, 2), dtype=torch.float64)
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match="float64 inputs run on the reference only"):
        snl_kernels.cosine_distances(t, s, backend=backend)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("level", list(WRN50), ids=list(WRN50))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrn50_shapes_on_gpu(backend, level, dtype):
    t, s = features(WRN50[level], dtype=dtype, requires_grad=True)
    _check_against_oracle(backend, t, s)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_compiles_fullgraph_on_gpu(backend):
    torch._dynamo.reset()

    def loss(teachers, students):
        terms = snl_kernels.spatial_channel_loss(teachers, students, backend=backend)
        return terms.pixel_mean + terms.channel_mean

    shapes = [(4, 64, 16, 16), (4, 128, 8, 8)]
    pairs = [features(sh, seed=k) for k, sh in enumerate(shapes)]
    students = [p[1].requires_grad_(True) for p in pairs]
    teachers = [p[0] for p in pairs]
    assert_fullgraph_compile_matches_eager(loss, teachers, students)



def test_triton_levels_in_one_launch_equal_one_launch_per_level():
    """Up to three levels share a launch (a branch per level): four levels (two launches),
    one of them channels-last, give the bits of one launch per level, forward and backward."""
    from support import NO_TRITON

    if NO_TRITON is not None:
        pytest.skip(NO_TRITON)
    from snl_kernels._triton import cosine_distances as kc

    shapes = [(2, 8, 6, 6), (2, 12, 3, 5), (2, 20, 2, 2), (2, 4, 7, 1)]
    pairs = [features(shape, seed=k) for k, shape in enumerate(shapes)]
    teachers = [t for t, _ in pairs]
    students = [s for _, s in pairs]
    students[1] = students[1].contiguous(memory_format=torch.channels_last)
    grouped = kc.forward_levels(teachers, students, reference.EPS)
    single = [kc.forward(t, s, reference.EPS) for t, s in zip(teachers, students, strict=True)]
    for a, b in zip(grouped, single, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    g = torch.Generator().manual_seed(2)
    ups = [[torch.randn(out[i].shape, generator=g).to(out[i].device) for out in single]
           for i in range(3)]
    for need_teacher in (False, True):
        grads = kc.backward_levels(teachers, students, [o[3] for o in single],
                                   [o[4] for o in single], *ups, need_teacher, reference.EPS)
        for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
            one = kc.backward(t, s, single[k][3], single[k][4], ups[0][k], ups[1][k],
                              ups[2][k], need_teacher, reference.EPS)
            for x, y in zip(grads[k], one, strict=True):
                assert torch.equal(x, y)


@pytest.mark.parametrize(("need_teacher", "backward_block"), [(False, 16), (True, 128)])
def test_triton_means_from_the_kernels_equal_the_means_of_the_distances(
        need_teacher, backward_block, monkeypatch):
    """``forward_levels(means=True)``: the three mean distances summed over levels, from the
    kernels' per-program shares, over several pixel tiles and channel blocks per level (16
    each), a ragged last tile and block, and four levels (two launches), with the pixels'
    and channels' inverse norms the fused loss takes; the backward in
    16-pixel tiles of 32 channels or 128-pixel tiles of 16; the sample sums
    are those of the channel sums. ``backward_levels(of_means=True)`` with the means' 0-dim
    gradients gives the float64 reference's gradients of those means."""
    from support import NO_TRITON

    if NO_TRITON is not None:
        pytest.skip(NO_TRITON)
    from snl_kernels._triton import cosine_distances as kc

    monkeypatch.setattr(kc, "blocks", lambda B, C, N, gpu=None: (16, 16, backward_block))
    shapes = [(3, 40, 5, 7), (3, 24, 6, 6), (3, 17, 3, 3), (3, 5, 2, 9)]
    pairs = [features(shape, seed=10 + k) for k, shape in enumerate(shapes)]
    teachers = [t for t, _ in pairs]
    students = [s for _, s in pairs]
    students[0][1, :, 2, 3] = 0  # a zero pixel: its distance is 1, it counts
    plain = kc.forward_levels(teachers, students, reference.EPS)
    levels, extra = kc.forward_levels(teachers, students, reference.EPS, means=True,
                                      norms=("pixel", "channel"))
    pixel_mean, channel_mean, sample_mean = extra["means"]
    assert len(levels) == len(shapes)
    for k, (a, b) in enumerate(zip(levels, plain, strict=True)):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        torch.testing.assert_close(extra["sample_stats"][k], b[4].sum(dim=2), rtol=1e-5,
                                   atol=1e-5)
        # Inverse norms from the sums of squares, negative for the zero pixel.
        for got_norms, stats in ((extra["pixel_norms"][k], b[3]),
                                 (extra["channel_norms"][k], b[4])):
            for r, squares in zip(got_norms, (stats[:, 1], stats[:, 2]), strict=True):
                want = squares.sqrt().clamp_min(reference.EPS).reciprocal()
                torch.testing.assert_close(r, torch.where(squares == 0, -want, want))
    assert (extra["pixel_norms"][0][1][1].view(-1)[2 * 7 + 3] < 0).item()
    for got, i in ((pixel_mean, 0), (channel_mean, 1), (sample_mean, 2)):
        want = torch.stack([out[i].double().mean() for out in plain]).sum()
        assert got.shape == ()
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    g = [torch.tensor(v, device=pixel_mean.device) for v in (0.7, -1.3, 2.0)]
    got = kc.backward_levels(teachers, students, [o[3] for o in levels], [o[4] for o in levels],
                             *[[x] * len(shapes) for x in g], need_teacher, reference.EPS,
                             sample_stats=extra["sample_stats"], of_means=True)
    # The float64 reference's gradients of sum_k (g0 mean pixel + g1 mean channel + g2 mean
    # sample).
    t64 = [t.detach().double().requires_grad_(True) for t in teachers]
    s64 = [s.detach().double().requires_grad_(True) for s in students]
    loss = sum(g[0].item() * d.pixel.mean() + g[1].item() * d.channel.mean()
               + g[2].item() * d.sample.mean()
               for d in map(reference.cosine_distances, t64, s64))
    want_t = torch.autograd.grad(loss, t64, retain_graph=True)
    want_s = torch.autograd.grad(loss, s64)
    for (grad_t, grad_s), w_t, w_s in zip(got, want_t, want_s, strict=True):
        pairs = [(grad_s, w_s)] + ([(grad_t, w_t)] if need_teacher else [])
        assert grad_t.numel() == (grad_s.numel() if need_teacher else 0)
        for x, y in pairs:
            assert x.shape == y.shape
            scale = y.abs().max()
            torch.testing.assert_close(x.double() / scale, y.to(x.device) / scale, rtol=0,
                                       atol=1e-5)
