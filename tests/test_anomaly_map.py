"""anomaly_map: kernels against the float64 reference (which matches scipy, test_reference.py).

The kernel tests run for each backend of ``kernel_backends()``: Triton (interpreted on CPU
without a GPU) and CUDA (skipped, with the reason, without a GPU and the built extension).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from support import (
    DEVICE,
    DTYPES,
    NO_CUDA_BACKEND,
    NO_TRITON,
    assert_matches_oracle,
    features,
    kernel_backends,
    requires_gpu,
)

import snl_kernels
from snl_kernels import reference
from snl_kernels.anomaly_map import IMPLEMENTED, blur_matrix, operators, upsample_matrix

triton_only = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
requires_cuda_backend = pytest.mark.skipif(NO_CUDA_BACKEND is not None,
                                           reason=NO_CUDA_BACKEND or "")


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
    # wider than the combination's widest tile (256 columns): two column tiles, the last ragged
    "output-wider-than-a-tile": ([(1, 4, 5, 7)], (18, 300), 1.0, "add"),
    "mul-two-levels": ([(2, 8, 16, 16), (2, 16, 8, 8)], (40, 24), 4.0, "mul"),
    "mul-three-levels-no-blur": ([(1, 4, 8, 8), (1, 4, 4, 4), (1, 4, 2, 2)], 16, 0.0, "mul"),
    "four-levels": ([(2, 4, 16, 16), (2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)], 32, 1.0, "add"),
    "channels-not-multiple-of-warps": ([(2, 13, 5, 7)], (9, 11), 1.0, "add"),
}
# Edges of the CUDA kernels' blocking, too slow for Triton's CPU interpreter: levels larger
# than the combine's chunks of m (64 rows, 32 columns), output wider than a tile (128) and not
# a multiple of its height (16); over 1024 blocks of 32 pixels (the 8-warp distance kernel).
CUDA_CASES = {
    "level-spans-chunks": ([(1, 3, 70, 40), (1, 20, 33, 9)], (150, 260), 2.0, "add"),
    "many-pixels": ([(2, 3, 128, 130), (2, 5, 9, 9)], (40, 30), 1.0, "add"),
}


def _check_case(backend, shapes, size, sigma, mode):
    teachers, students = _levels(shapes)
    got = snl_kernels.anomaly_map(teachers, students, size, sigma, mode, backend=backend)
    want = _oracle(teachers, students, size, sigma, mode)
    assert got.maps.dtype == torch.float32
    assert got.scores.dtype == torch.float32
    assert got.maps.shape == want.maps.shape
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)
    assert_matches_oracle(got.scores, want.scores, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_kernel_matches_reference(backend, case):
    _check_case(backend, *case)


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.parametrize("case", list(CUDA_CASES.values()), ids=list(CUDA_CASES))
def test_cuda_blocking_edges_match_reference(case):
    _check_case("cuda", *case)


@triton_only
@pytest.mark.parametrize("pixels", [128, 16])
def test_triton_distances_in_the_gpu_plans_tiles(pixels, monkeypatch):
    """The distance kernel in the tiles a GPU plan picks (the interpreter keeps 64 pixels of
    32 channels): 128 pixels of 16 channels, as at the WRN50 levels at B = 16, and 16 of
    32, each with a ragged last tile and channels that do not fill the last step."""
    from snl_kernels._triton import anomaly_map as kernels

    monkeypatch.setattr(kernels, "cosine_blocks", lambda B, C, N, gpu=None: (64, 128, pixels))
    _check_case("triton", [(2, 40, 13, 11), (2, 21, 6, 6)], (24, 20), 1.0, "add")


@triton_only
def test_triton_distance_launch_writes_every_element_of_its_buffer(monkeypatch):
    """The padded (B, L, HK, WK) buffer starts as uninitialised memory (NaN here): the
    distance launch writes each level's pixels and the zeros around them, four levels in
    two launches."""
    from snl_kernels import reference
    from snl_kernels._triton import anomaly_map as kernels

    shapes = [(2, 6, 9, 7), (2, 5, 5, 11), (2, 4, 3, 3), (2, 3, 16, 16)]
    teachers, students = _levels(shapes)
    real_empty = torch.empty
    monkeypatch.setattr(kernels.torch, "empty",
                        lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    m = kernels.pixel_distances(teachers, students, reference.EPS)
    monkeypatch.undo()
    assert m.shape == (2, 4, 16, 16)
    for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
        _, _, h, w = t.shape
        want = reference.cosine_distances(t.float(), s.float()).pixel
        torch.testing.assert_close(m[:, k, :h, :w], want, atol=1e-5, rtol=1e-5)
        padding = m[:, k].clone()
        padding[:, :h, :w] = 0
        assert torch.equal(padding, torch.zeros_like(padding)), k


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_inputs(backend, dtype):
    teachers, students = _levels([(2, 24, 8, 8), (2, 40, 4, 4)], dtype=dtype)
    got = snl_kernels.anomaly_map(teachers, students, 32, 2.0, backend=backend)
    want = _oracle(teachers, students, 32, 2.0, "add")
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_zero_vectors_give_distance_one(backend):
    teachers, students = _levels([(2, 4, 6, 6), (2, 8, 3, 3)])
    teachers[0][:, :, 0] = 0
    students[0][:, :, 1] = 0
    students[1][:, :, 2] = 0
    got = snl_kernels.anomaly_map(teachers, students, 12, 1.0, backend=backend)
    want = _oracle(teachers, students, 12, 1.0, "add")
    assert not got.maps.isnan().any()
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_any_strides(backend):
    teachers, students = _levels([(2, 6, 8, 10), (2, 6, 4, 5)])
    views_t = [teachers[0].contiguous(memory_format=torch.channels_last),
               teachers[1].transpose(2, 3).contiguous().transpose(2, 3)]
    views_s = [students[0][:, :, :, :].contiguous(memory_format=torch.channels_last),
               torch.cat([students[1], students[1]], dim=1)[:, 6:]]
    got = snl_kernels.anomaly_map(views_t, views_s, (24, 30), 1.0, backend=backend)
    want = snl_kernels.anomaly_map(teachers, students, (24, 30), 1.0, backend=backend)
    assert torch.equal(got.maps, want.maps)


@pytest.mark.parametrize("backend", kernel_backends())
def test_deterministic_bits(backend):
    teachers, students = _levels([(2, 8, 16, 16), (2, 16, 8, 8)])
    a = snl_kernels.anomaly_map(teachers, students, 48, backend=backend)
    b = snl_kernels.anomaly_map(teachers, students, 48, backend=backend)
    assert torch.equal(a.maps, b.maps)
    assert torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("namespace", [
    pytest.param("snl_triton", marks=triton_only, id="triton"),
    pytest.param("snl_cuda", marks=[pytest.mark.gpu, requires_cuda_backend], id="cuda"),
])
def test_opcheck(namespace):
    teachers, students = _levels([(2, 4, 8, 8), (2, 8, 4, 4)])
    torch.library.opcheck(getattr(torch.ops, namespace).anomaly_map.default,
                          (teachers, students, [16, 12], 1.0, "add"), test_utils=(
                              "test_schema", "test_faketensor", "test_aot_dispatch_static"))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("backend", kernel_backends())
def test_compiles_fullgraph_on_gpu(backend, mode):
    torch._dynamo.reset()
    teachers, students = _levels([(2, 4, 8, 8), (2, 8, 4, 4)])
    fn = torch.compile(lambda ts, ss: snl_kernels.anomaly_map(ts, ss, (16, 12), 1.0, mode,
                                                              backend=backend), fullgraph=True)
    got = fn(teachers, students)
    want = snl_kernels.anomaly_map(teachers, students, (16, 12), 1.0, mode, backend=backend)
    assert torch.equal(got.maps, want.maps)


@pytest.mark.gpu
@requires_cuda_backend
def test_cuda_ops_opcheck():
    teachers, students = _levels([(2, 4, 8, 8), (2, 8, 4, 5)])
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.snl.anomaly_map_distances.default,
                          (teachers, students, 9, 8), test_utils=utils)
    m = torch.ops.snl.anomaly_map_distances(teachers, students, 8, 8)
    mh, mw = operators(((8, 8), (4, 5)), (20, 140), 1.0, 8, 8, DEVICE)
    torch.library.opcheck(torch.ops.snl.anomaly_map_combine.default, (m, mh, mw, 20, 140),
                          test_utils=utils)


@pytest.mark.gpu
@requires_cuda_backend
def test_cuda_ops_match_their_formulas():
    teachers, students = _levels([(3, 5, 9, 7), (3, 6, 4, 11)], dtype=torch.float16)
    m = torch.ops.snl.anomaly_map_distances(teachers, students, 10, 12)
    assert m.shape == (3, 2, 10, 12)
    for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
        _, _, h, w = t.shape
        want = 1 - F.cosine_similarity(t.double(), s.double(), dim=1, eps=reference.EPS)
        torch.testing.assert_close(m[:, k, :h, :w].double(), want, atol=2e-6, rtol=0)
        assert m[:, k, h:].abs().max() == 0
        assert m[:, k, :, w:].abs().max() == 0
    g = torch.Generator().manual_seed(0)
    mh = torch.rand(2, 37, 10, generator=g).to(DEVICE)
    mw = torch.rand(2, 300, 12, generator=g).to(DEVICE)
    maps, scores = torch.ops.snl.anomaly_map_combine(m, mh, mw, 37, 300)
    want = torch.einsum("khi,bkij,kwj->bhw", mh.double(), m.double(), mw.double()).unsqueeze(1)
    torch.testing.assert_close(maps.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores, maps.amax(dim=(1, 2, 3)))


def _cuda_features(*shape, dtype=torch.float32):
    return torch.randn(shape, device="cuda", dtype=dtype)


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.parametrize(("call", "match"), [
    # No tensor at all: the dispatcher cannot choose a kernel and says so before the op's own
    # check ("teachers must hold at least one level") could run.
    (lambda t: torch.ops.snl.anomaly_map_distances([], [], 4, 4),
     r"There were no tensor arguments to this function"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t], [t, t], 4, 4),
     r"teachers and students must have the same number of levels, got 1 and 2"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t.cpu()], [t], 4, 4),
     r"teachers\[0\] must be a CUDA tensor, got device cpu"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t, t[0]], [t, t[0]], 4, 4),
     r"teachers\[1\] must have 4 dimensions, got shape \[3, 4, 4\]"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t], [t[:, :2]], 4, 4),
     r"students\[0\] must have shape \[2, 3, 4, 4\], got \[2, 2, 4, 4\]"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t.double()], [t.double()], 4, 4),
     r"teachers\[0\] must be float32, float16 or bfloat16, got Double"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t], [t.half()], 4, 4),
     r"students\[0\] must have the dtype of teachers\[0\], got Half and Float"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t, t[:1]], [t, t[:1]], 4, 4),
     r"teachers\[1\] must have the batch size of teachers\[0\], 2, got shape \[1, 3, 4, 4\]"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t], [t], 3, 4),
     r"hk and wk must be at least the height and width of every level, got hk=3, wk=4"),
    (lambda t: torch.ops.snl.anomaly_map_distances([t[:, :0]], [t[:, :0]], 4, 4),
     r"teachers\[0\] must not be empty, got shape \[2, 0, 4, 4\]"),
    (lambda t: torch.ops.snl.anomaly_map_combine(t, torch.zeros(3, 9, 4, device="cuda"),
                                                 torch.zeros(3, 8, 4, device="cuda"), 8, 8),
     r"mh must have shape \[3, 8, 4\], got \[3, 9, 4\]"),
    (lambda t: torch.ops.snl.anomaly_map_combine(t.double(), t, t, 8, 8),
     r"m must be Float, got Double"),
    (lambda t: torch.ops.snl.anomaly_map_combine(t[0], t, t, 8, 8),
     r"m must have 4 dimensions, got shape \[3, 4, 4\]"),
    (lambda t: torch.ops.snl.anomaly_map_combine(t, torch.zeros(3, 8, 4, device="cuda"),
                                                 torch.zeros(3, 8, 4, device="cuda"), 0, 8),
     r"height and width must be positive, got 0 and 8"),
    (lambda t: torch.ops.snl.anomaly_map_combine(t, torch.zeros(3, 8, 4), torch.zeros(3, 8, 4),
                                                 8, 8),
     r"mh must be on the same device as m, got cpu and cuda:0"),
    (lambda t: torch.ops.snl.anomaly_map_combine(t, torch.zeros(3, 8, 4, device="cuda"),
                                                 torch.zeros(3, 9, 4, device="cuda"), 8, 8),
     r"mw must have shape \[3, 8, 4\], got \[3, 9, 4\]"),
], ids=["empty", "level-count", "cpu", "not-4d", "shape", "float64", "dtype-mismatch", "batch",
        "hk-too-small", "empty-level", "mh-shape", "m-dtype", "m-dim", "height", "mh-device",
        "mw-shape"])
def test_cuda_ops_reject_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(_cuda_features(2, 3, 4, 4))


def test_gradients_fall_back_to_reference_in_automatic_mode():
    teachers, students = _levels([(1, 4, 4, 4)])
    students = [s.requires_grad_(True) for s in students]
    out = snl_kernels.anomaly_map(teachers, students, 8)
    out.maps.sum().backward()
    assert students[0].grad is not None


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gradients_refused_by_kernels(backend):
    teachers, students = _levels([(1, 4, 4, 4)])
    students = [s.requires_grad_(True) for s in students]
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match="the inputs require grad and the anomaly-map kernels are "
                             "inference-only"):
        snl_kernels.anomaly_map(teachers, students, 8, backend=backend)


def test_cuda_backend_refuses_cpu_inputs_with_reasons():
    teachers, students = _levels([(1, 4, 4, 4)])
    with pytest.raises(snl_kernels.BackendUnavailableError,
                       match=r"anomaly_map: backend='cuda' cannot run: .*the inputs are on "
                             r"\['cpu'\]; the CUDA kernels need CUDA tensors"):
        snl_kernels.anomaly_map([t.cpu() for t in teachers], [s.cpu() for s in students], 8,
                                backend="cuda")


def test_cuda_reason_names_kernels_missing_from_an_older_build(monkeypatch):
    from snl_kernels import _cuda, dispatch

    # An extension that loads but lacks this op's kernels (built from older sources).
    monkeypatch.setattr(_cuda, "load", lambda: True)
    monkeypatch.setattr(_cuda, "has_op", lambda name: name != "anomaly_map_combine")
    why = dispatch.unavailable_reasons("cuda", "anomaly_map", [], IMPLEMENTED)
    assert any("built without snl::anomaly_map_combine" in r and "rebuild" in r for r in why)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [16, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", kernel_backends())
def test_wrn50_on_gpu(backend, batch, dtype):
    shapes = [(batch, 256, 64, 64), (batch, 512, 32, 32), (batch, 1024, 16, 16)]
    teachers, students = _levels(shapes, dtype=dtype)
    assert teachers[0].device.type == DEVICE
    got = snl_kernels.anomaly_map(teachers, students, 256, backend=backend)
    want = _oracle(teachers, students, 256, 4.0, "add")
    assert_matches_oracle(got.maps, want.maps, atol=1e-5)
    assert_matches_oracle(got.scores, want.scores, atol=1e-5)


@triton_only
def test_combination_forms_each_row_product_once_per_row_of_tiles():
    # Rows as wide as the output (up to 256 columns): at the benchmark's 256 x 256 and
    # B = 16, 256 programs of 8 warps, one wave of an H200 at two per SM.
    kernels = importlib.import_module("snl_kernels._triton.anomaly_map")
    assert kernels.combine_tiles(256) == (16, 256, 8, 2)
    assert kernels.combine_tiles(300) == (16, 256, 8, 2)
    assert kernels.combine_tiles(36) == (16, 64, 4, 2)
    assert kernels.combine_tiles(5) == (16, 16, 4, 2)
