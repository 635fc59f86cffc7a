"""How the Triton kernels fill an H200, checked from their launch plans, and how many
launches the model makes, counted under the interpreter.

The plans (blocks and grids a GPU launch uses, ``gpu=True``) are plain functions of the
shapes, so the benchmark shapes of BENCHMARKS.md (B = 16, WRN50 levels, CRAM at D = 2048,
8 x 8, K = 64) are checked here without a GPU: every launch there has at least one program
per SM. The kernels themselves run these plans in ``test_triton_gpu_config.py``.
"""

from __future__ import annotations

import collections
import os

import pytest
from support import NO_TRITON, require_model_extra

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

SMS = 132  # an H200's streaming multiprocessors
WRN50_LEVELS = ((256, 64, 64), (512, 32, 32), (1024, 16, 16))
B = 16


def _cdiv(a, b):
    return -(-a // b)


def test_cosine_kernels_have_a_program_per_sm_at_every_level():
    from snl_kernels._triton import cosine_distances as kernels

    backward_programs = 0
    for C, H, W in WRN50_LEVELS:
        block_n, block_fin, block_bwd = kernels.blocks(B, C, H * W, gpu=True)
        assert _cdiv(H * W, block_n) * B >= SMS, (C, H, W)  # forward
        assert _cdiv(C, block_fin) * B >= SMS, (C, H, W)  # finish
        assert _cdiv(H * W, block_bwd) * B >= SMS, (C, H, W)  # backward
        backward_programs += _cdiv(H * W, block_bwd) * B
        # A backward step's tile holds no more elements than a forward step's.
        assert block_bwd * kernels._backward_channels(block_bwd) <= (
            kernels.BLOCK_N * kernels.BLOCK_C)
    # The deepest level, which had 64 programs of 64 pixels, now has 16-pixel tiles.
    assert kernels.blocks(B, 1024, 256, gpu=True)[0] == 16
    # The backward's programs over the three levels fit one wave at 8 per SM (64
    # registers in its sm_90 SASS: benchmarks/perf_model.json).
    assert backward_programs == 1024 <= 8 * SMS
    # Under the interpreter's configuration the largest blocks stay.
    assert kernels.blocks(B, 1024, 256, gpu=False) == (
        kernels.BLOCK_N, kernels.BLOCK_FIN, kernels.BLOCK_N)


def test_anomaly_map_distances_of_every_level_in_one_launch_deepest_first():
    from snl_kernels._triton import anomaly_map, cosine_distances

    # Each level's share of the one launch has a program per SM by itself, in the cosine
    # backward's tiles: one wave at 8 programs per SM over the three levels.
    programs = 0
    for C, H, W in WRN50_LEVELS:
        programs += _cdiv(H * W, cosine_distances.blocks(B, C, H * W, gpu=True)[2]) * B
        assert _cdiv(H * W, cosine_distances.blocks(B, C, H * W, gpu=True)[2]) * B >= SMS
    assert programs <= 8 * SMS
    assert anomaly_map.GROUP == 3


def test_cram_kernels_have_a_program_per_sm_at_the_benchmark_shape():
    from snl_kernels._triton import cram

    p = cram.plan(B, 2048, 64, 64, gpu=True)
    grids = {
        "dots (forward and backward)": p["rows"] * p["SPLIT"],
        "forward": p["rows"] * p["D_BLOCKS"],
        # the backward's one launch runs both kinds of programs; each kind fills the SMs
        "backward rows": p["rows"] * p["D_BLOCKS"],
        "centre gradient": p["CENTRE_BLOCKS"] * p["P_SLICES"],
    }
    assert all(programs >= SMS for programs in grids.values()), grids
    # The slices cover D and the positions exactly once.
    assert p["SPLIT"] * p["D_SLICE"] >= 2048 > (p["SPLIT"] - 1) * p["D_SLICE"]
    assert p["D_BLOCKS"] * p["D_CHUNK"] >= 2048 > (p["D_BLOCKS"] - 1) * p["D_CHUNK"]
    assert p["P_SLICES"] * p["P_SLICE"] >= B * 64 > (p["P_SLICES"] - 1) * p["P_SLICE"]
    assert cram.PRECISION == "tf32x3"  # tensor-core products with about fp32 accuracy


def test_cram_extra_memory_at_a_thousand_images():
    from snl_kernels._triton import cram

    # D = 2048, K = 256, B = 1000 at 8 x 8: at most 256 MB of buffers alive at once.
    assert cram.workspace_bytes(1000, 2048, 64, 256, gpu=True) <= 256e6
    shapes = cram.workspace(1000, 2048, 64, 256, gpu=True)
    # No buffer per row block of D-wide partials (4,000 x 256 x 2048 floats: 8 GB).
    assert shapes["backward"]["g_c_partial"][0] <= 8


# ------------------------------------------------------------------ launches, counted


def _count_launches(run):
    """Triton launches made by ``run()`` under the interpreter: {kernel name: count}."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = collections.Counter()
    real = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return real(self, *args, **kwargs)

    InterpretedFunction.run = counting
    try:
        run()
    finally:
        InterpretedFunction.run = real
    return counts


#: Launches of one SNL training loss, forward and backward (resnet18, 64 x 64, B = 2, every
#: term, CRAM): issue #16's bound. 74 before snl_distillation_loss shared the norms and pooled
#: levels and grouped the levels' cosine, pooling, Delta, tiled-gradient, norm-backward,
#: product and unpooling launches; 18 before the Gram path's backward took the Grams its
#: forward wrote and CRAM's backward ran its two kinds of programs in one launch; 17 since the
#: norm backwards add into the levels' gradients in their kernels (two launches, where the
#: inter-affinity terms add to what the intra-affinity ones write), which took PyTorch's
#: additions of feature-sized gradients away (seven launches of their own on a GPU). The
#: test fails when the count rises above it.
LOSS_LAUNCHES = 17
PREDICT_LAUNCHES = 5


@pytest.fixture(scope="module")
def model():
    require_model_extra()
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts launches under Triton's interpreter (TRITON_INTERPRET=1)")
    import torch

    import snl

    torch.manual_seed(0)
    return snl.SNL("resnet18", pretrained=False, num_centers=4, w_ch=1.0, w_sp=1.0,
                   w_intra=1.0, w_inter=1.0, w_c=1.0, w_rd=1.0), torch.randn(2, 3, 64, 64)


def test_training_loss_launches(model, monkeypatch):
    net, images = model
    monkeypatch.setenv("SNL_BACKEND", "triton")
    net.train()
    counts = _count_launches(lambda: net.loss(images)["total"].backward())
    total = sum(counts.values())
    assert total <= LOSS_LAUNCHES, dict(counts)
    assert counts["_cram_dots_kernel"] == 2  # forward and backward
    assert counts["_cram_fwd_kernel"] == counts["_cram_bwd_kernel"] == 1
    # Level 1 (64 channels, 256 pixels) takes the Gram path: its loss kernel writes the
    # backward's Grams, so the backward only applies them.
    assert counts["_gram_loss_kernel"] == counts["_gram_apply_kernel"] == 1
    # The pixels' norms come from the cosine kernel's sums, the pooled levels and their
    # channels' norms from one launch in the forward; the three levels' cosine terms share
    # one launch per phase.
    assert counts["_inv_norm_kernel"] == counts["_pool_kernel"] == 0
    assert counts["_pool_norms_kernel"] == 1
    for phase in ("fwd", "fin", "bwd"):
        assert counts[f"_cosine_distances_{phase}_kernel"] == 1
    # Every norm backward of the affinity terms (3 levels, 2 pairs x 2) in two launches: the
    # second adds the inter-affinity terms' into what the first wrote.
    assert counts["_norm_bwd_group_kernel"] == 2
    assert counts["_norm_bwd_kernel"] == 0
    # Both pairs' two products in one launch, both pairs' unpooling in one.
    assert counts["_scaled_mm_group_kernel"] == counts["_unpool_group_kernel"] == 1
    # The tiled levels' and pairs' Deltas in one launch forward, the pairs' gradients in one.
    assert counts["_delta_group_kernel"] == 2
    assert counts["_delta_kernel"] == 0
    assert counts["_intra_tiled_grad_group_kernel"] == 1  # levels 2 and 3 (tiled path)


def test_predict_launches(model, monkeypatch):
    net, images = model
    monkeypatch.setenv("SNL_BACKEND", "triton")
    net.eval()
    counts = _count_launches(lambda: net.predict(images))
    assert sum(counts.values()) <= PREDICT_LAUNCHES, dict(counts)
    # The three levels' distances in one launch, then the combination.
    assert counts["_pixel_distance_kernel"] == 1
    assert counts["_combine_kernel"] == 1


# Tensor methods that wait for the device (a value or a copy on the host): one of them in the
# training loss would break a CUDA-graph capture and stall the host on every step.
_HOST_SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__",
               "__index__")


def test_training_loss_waits_for_no_device_value(model, monkeypatch):
    """Issue #16 part 3: the loss can be captured in a CUDA graph only if its forward and
    backward read no tensor value on the host. Every call of a syncing Tensor method from
    the library's code (snl_kernels/, snl/) during one training loss is recorded; there must
    be none. (The graph capture itself runs in the GPU round's profile step.)"""
    import sys

    import torch

    net, images = model
    monkeypatch.setenv("SNL_BACKEND", "triton")
    net.train()
    package_dirs = (os.sep + "snl_kernels" + os.sep, os.sep + "snl" + os.sep)
    calls = []

    def recording(name, real):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(d in caller for d in package_dirs):
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)
        return method

    for name in _HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    net.loss(images)["total"].backward()
    assert calls == []
