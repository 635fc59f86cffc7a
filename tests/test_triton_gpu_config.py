"""Every Triton op in the GPU's launch configuration, against the float64 reference.

``SNL_TRITON_CONFIG=gpu`` makes the launchers choose the tiles, blocks, warps and precisions
of a GPU launch also under the CPU interpreter (see ``snl_kernels/_triton/__init__.py``), so
the configuration a GPU runs is executed here before any GPU sees it. The shapes are the
smallest that fill the GPU's blocks (64-pixel Delta tiles, 256- and 64-channel blocks of the
tiled backward, ...); each test records the launches and checks the GPU's blocks were used.
"""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, NO_TRITON, assert_matches_oracle, features, oracle_inputs

import snl_kernels
from snl_kernels import reference
from snl_kernels._triton import CONFIG_VARIABLE, gpu_config
from snl_kernels.intra_affinity_loss import use_grams

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

LOSS_RTOL = 1e-4  # the affinity bar (tests/test_affinity.py)
GRAD_RTOL = 1e-3


def _modules():
    from snl_kernels._triton import affinity, anomaly_map, cosine_distances, cram

    return affinity, anomaly_map, cosine_distances, cram


@pytest.fixture
def launches(monkeypatch):
    """The GPU configuration in force, and the list of launches made as (kernel name, its
    keyword arguments and launch options): every launcher launches through
    ``snl_kernels._triton.launch``, whose hook sees each launch."""
    from snl_kernels._triton import launch

    monkeypatch.setenv(CONFIG_VARIABLE, "gpu")
    monkeypatch.delenv("SNL_DOT_PRECISION", raising=False)
    log = []

    def record(fn, grid, args, options):
        log.append((fn.__name__, {**args, **options}))
        launch.bound(fn, grid, args, options)

    monkeypatch.setattr(launch, "hook", record)
    return log


def _launched(log, kernel, **expected):
    """The launches of ``kernel``; each has the ``expected`` keyword values."""
    found = [kw for name, kw in log if name == kernel]
    assert found, f"{kernel} was not launched"
    for kw in found:
        got = {k: kw.get(k) for k in expected}
        assert got == expected, f"{kernel}: {got}, want {expected}"
    return found


def _check(fn, ref_fn, inputs, loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL):
    """A scalar loss and its gradients against ref_fn in float64 on the same values."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    x64 = oracle_inputs(*inputs)
    loss, ref = fn(*xs), ref_fn(*x64)
    assert abs(loss.item() - ref.item()) <= loss_rtol * abs(ref.item()), (loss.item(), ref.item())
    for g, r in zip(torch.autograd.grad(loss, xs), torch.autograd.grad(ref, x64), strict=True):
        assert g.shape == r.shape
        err = (g.double() - r.to(g.device)).norm().item()
        assert err <= grad_rtol * r.norm().item(), (err, r.norm().item())


# --------------------------------------------------------------------------- configuration


def test_config_variable(monkeypatch):
    monkeypatch.delenv(CONFIG_VARIABLE, raising=False)
    assert gpu_config(interpreted=False)
    assert not gpu_config(interpreted=True)
    monkeypatch.setenv(CONFIG_VARIABLE, "")
    assert not gpu_config(interpreted=True)
    monkeypatch.setenv(CONFIG_VARIABLE, "gpu")
    assert gpu_config(interpreted=True)
    monkeypatch.setenv(CONFIG_VARIABLE, "cpu")
    assert not gpu_config(interpreted=False)
    monkeypatch.setenv(CONFIG_VARIABLE, "GPU")
    with pytest.raises(ValueError, match=r"SNL_TRITON_CONFIG must be one of gpu, cpu .*'GPU'"):
        gpu_config(interpreted=True)


def test_launches_read_the_config_each_time(monkeypatch):
    affinity = _modules()[0]
    monkeypatch.setenv(CONFIG_VARIABLE, "gpu")
    gpu = affinity._tiles()
    monkeypatch.setenv(CONFIG_VARIABLE, "cpu")
    cpu = affinity._tiles()
    assert gpu == (affinity.BLOCK_TILE_GPU, affinity.MAX_BLOCK_C_GPU,
                   affinity.MAX_BLOCK_C_SIGNS_GPU) == (64, 256, 64)
    # Every GPU tile is larger than the interpreter's: a launch with a GPU tile below proves
    # the GPU configuration ran.
    assert all(g > c for g, c in zip(gpu, cpu, strict=True)), (gpu, cpu)
    monkeypatch.setenv(CONFIG_VARIABLE, "fast")
    t, s = features((1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"SNL_TRITON_CONFIG .*'fast'"):
        snl_kernels.intra_affinity_loss(t, s, "l1", backend="triton")


# --------------------------------------------------------------------------- affinity

# (B, C, H, W): the tiled path's 64 x 64 Delta tiles need N >= 64 pixels (two tiles: 128);
# l2 takes it when N <= C, its backward reading the Delta its forward wrote (the op's
# gradient is asked for), in 64-channel blocks as l1's backward from sign bits (prepared
# operands). The Gram path (l2, C < N) prepares its operands (256 pixels x 160 channels:
# single tf32 products, the GPU's default), forms the loss over 64 x 64 tiles of the upper
# triangle (three tiles, six pairs) from them, and applies its Grams to 64 pixels x every
# channel (C <= 256) with the norm backward in the same launch.
INTRA = {
    "tiled-l2": ((1, 256, 8, 16), "l2", dict(BI=64, BC=64, SIGNS=2)),
    "tiled-l1": ((2, 64, 8, 16), "l1", dict(BI=64, BC=64)),
    "grams-l2": ((1, 160, 16, 16), "l2", None),
}


@pytest.mark.parametrize("case", list(INTRA.values()), ids=list(INTRA))
def test_intra_affinity(launches, case):
    shape, distance, tiled = case
    _, C, H, W = shape
    assert use_grams(C, H * W, distance) == (tiled is None)
    t, s = features(shape)
    _check(lambda t, s: snl_kernels.intra_affinity_loss(t, s, distance, backend="triton"),
           lambda t, s: reference.intra_affinity_loss(t, s, distance), [t, s])
    if tiled is None:
        _launched(launches, "_gram_prepare_kernel", BC=256, BP=16, PRECISION="tf32")
        _launched(launches, "_gram_loss_kernel", BI=64, PREPARED=True, PRECISION="tf32")
        _launched(launches, "_gram_apply_norm_kernel", BC=256, BN=64, PRECISION="tf32")
    elif distance == "l1":  # tf32x3 from prepared operands, the backward from sign bits
        _launched(launches, "_delta_prepared_kernel", BI=64, BJ=64)
        _launched(launches, "_grad_prepared_kernel", BJ=64, **tiled)
    else:
        _launched(launches, "_delta_kernel", BI=64, BJ=64, L1=False, WRITE_SIGNS=3)
        _launched(launches, "_intra_tiled_grad_kernel", BJ=64, **tiled)


# ((B, C_a, H_a, W_a), (C_b, H_b, W_b)): 64 x 64 tiles of the C_a x C_b Delta (C_b spans two)
# and the backward's products over the 64 pixels of the coarser level.
INTER_SHAPES = ((1, 64, 16, 16), (96, 8, 8))


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_inter_affinity(launches, distance):
    (B, C_a, H_a, W_a), (C_b, H_b, W_b) = INTER_SHAPES
    t_a, s_a = features((B, C_a, H_a, W_a))
    t_b, s_b = features((B, C_b, H_b, W_b), seed=1)
    _check(lambda *x: snl_kernels.inter_affinity_loss(*x, distance=distance, backend="triton"),
           lambda *x: reference.inter_affinity_loss(*x, distance=distance), [t_a, t_b, s_a, s_b])
    if distance == "l1":  # tf32x3: level b's operands prepared, the signs kept as they are
        _launched(launches, "_inter_prepare_kernel", BC=64, BN=64)
        _launched(launches, "_inter_delta_prepared_kernel", BI=64, BJ=64, WRITE_SIGNS=2)
    else:
        _launched(launches, "_delta_kernel", BI=64, BJ=64, L1=False)
    # The two products of the student's backward share one launch.
    _launched(launches, "_scaled_mm_group_kernel", BM0=64, BN0=64, BM1=64, BN1=64,
              P0="tf32x3-exact-b" if distance == "l1" else "tf32x3")


# --------------------------------------------------------------------------- the other ops
# Their blocks are the same in both configurations; the shapes fill them and span two.


def test_cosine_distances(launches):
    kernels = _modules()[2]
    shape = (2, 160, 9, 9)  # 81 pixels, 160 channels: several tiles and finish blocks
    # Few programs at this size: the GPU's blocks shrink to the smallest (16 pixels, 16
    # channels), which therefore run here; more than one tile and channel block each.
    block_n, block_fin, block_bwd = kernels.blocks(2, 160, 81, gpu=True)
    assert (block_n, block_fin, block_bwd) == (kernels.MIN_BLOCK,) * 3
    t, s = features(shape, requires_grad=True)
    out = snl_kernels.cosine_distances(t, s, backend="triton")
    t64, s64 = oracle_inputs(t, s)
    ref = reference.cosine_distances(t64, s64)
    for a, r in zip(out, ref, strict=True):
        assert_matches_oracle(a, r)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(DEVICE) for r in ref]
    loss = sum((o * w.float()).sum() for o, w in zip(out, weights, strict=True))
    ref_loss = sum((r * w).sum() for r, w in zip(ref, weights, strict=True))
    grads = torch.autograd.grad(loss, (t, s))
    ref_grads = torch.autograd.grad(ref_loss, (t64, s64))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        scale = ref_grad.abs().max().item()
        assert_matches_oracle(grad / scale, ref_grad / scale)
    # One level: slot 0 of the (up to three) levels a launch takes.
    _launched(launches, "_cosine_distances_fwd_kernel", BLOCK_N0=block_n, BLOCK_C=32)
    _launched(launches, "_cosine_distances_fin_kernel", BLOCK_C0=block_fin)
    _launched(launches, "_cosine_distances_bwd_kernel", BLOCK_N0=block_bwd,
              BLOCK_C0=kernels._backward_channels(block_bwd))


def test_cram(launches):
    B, D, H, W, K = 2, 96, 5, 7, 20  # 70 positions: three 32-blocks; D spans two 64-blocks
    g = torch.Generator().manual_seed(0)
    e = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    c = torch.randn(K, D, generator=g, dtype=torch.float64)
    inputs = [e.float().to(DEVICE), c.float().to(DEVICE), torch.tensor(1.0, device=DEVICE)]
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(shape, generator=g, dtype=torch.float64)
               for shape in ((B, D, H, W), (B, K, H, W), (B, H, W))]

    def loss(out, dtype):
        return sum((o * w.to(o.device, dtype)).sum() for o, w in zip(out, weights, strict=True))

    _check(lambda *x: loss(snl_kernels.cram(*x, backend="triton"), torch.float32),
           lambda *x: loss(reference.cram(*x), torch.float64), inputs,
           loss_rtol=1e-5, grad_rtol=1e-4)
    for kernel in ("_cram_dots_kernel", "_cram_fwd_kernel", "_cram_bwd_kernel"):
        _launched(launches, kernel, KP=32, BLOCK_P=32, BLOCK_D=64, PRECISION="tf32x3")
    # Three row blocks: the GPU's plan cuts D and the positions into as many pieces as
    # there are blocks, so slices are added in every kernel that has them.
    plan = _modules()[3].plan(B, D, H * W, K, gpu=True)
    assert (plan["rows"], plan["SPLIT"], plan["D_BLOCKS"], plan["P_SLICES"]) == (3, 2, 2, 3)


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_anomaly_map(launches, mode):
    # Levels of 81 and 25 pixels (64-pixel distance blocks, 40 and 48 channels: two 32-blocks)
    # into a 40 x 36 map: two 32 x 32 output tiles each way.
    shapes = [(2, 40, 9, 9), (2, 48, 5, 5)]
    pairs = [features(shape, seed=k) for k, shape in enumerate(shapes)]
    teachers, students = [p[0] for p in pairs], [p[1] for p in pairs]
    got = snl_kernels.anomaly_map(teachers, students, (40, 36), 2.0, mode, backend="triton")
    want = reference.anomaly_map([t.double() for t in teachers],
                                 [s.double() for s in students], (40, 36), 2.0, mode)
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)
    assert_matches_oracle(got.scores, want.scores, atol=1e-5)
    # One launch for both levels, each with the GPU's pixel tile for its size (the cosine
    # backward's) and as many channels per step as that tile takes.
    kernels = _modules()[2]
    found = _launched(launches, "_pixel_distance_kernel")
    assert len(found) == 1
    deep_first = sorted(shapes, key=lambda shape: -shape[1])
    for j, (b, c, h, w) in enumerate(deep_first):
        block = kernels.blocks(b, c, h * w, gpu=True)[2]
        assert found[0][f"BLOCK_P{j}"] == block
        assert found[0][f"BLOCK_C{j}"] == kernels._backward_channels(block)
    if mode == "add":  # (mul multiplies the upsampled levels in PyTorch)
        # 16 rows per program, as wide as the output (36 columns: a 64-column tile).
        _launched(launches, "_combine_kernel", BLOCK_H=16, BLOCK_W=64)


def test_gram_loss_warps_fill_the_device_in_one_wave_where_they_can():
    from snl_kernels._triton import affinity_gram

    cpu = torch.device("cpu")  # stands in for an H200's 132 SMs
    assert affinity_gram.STAND_IN_SMS == 132
    # WRN50 at B = 16: level 1 (10 tile pairs) at two programs per SM, level 2 (36) at one.
    assert affinity_gram.gram_loss_warps(10 * 16, 64, cpu) == 4
    assert affinity_gram.gram_loss_warps(2 * 132, 64, cpu) == 4
    assert affinity_gram.gram_loss_warps(2 * 132 + 1, 64, cpu) == 8
    assert affinity_gram.gram_loss_warps(36 * 16, 64, cpu) == 8
    assert affinity_gram.gram_loss_warps(10_000, 32, cpu) == 4  # 32-row tiles: 4 warps
