"""The pre-bound launcher (snl_kernels/_triton/launch.py) through the real launch path:
kernels compiled for sm_90, Triton's C launcher over the performance model's stand-in
libcuda, CPU tensors standing in for CUDA ones (tests/launch_probe.py, in a process without
the interpreter). Its speed is benchmarks/bench_host_step.py's."""

from __future__ import annotations

import pytest
import torch
from support import compiled_probe

pytest.importorskip("triton", reason="the Triton backend needs triton")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU the kernel tests launch for real")


@pytest.fixture(scope="module")
def seen():
    return compiled_probe("launch_probe.py", SNL_TRITON_CONFIG="gpu")


def test_a_repeated_launch_skips_tritons_binder(seen):
    assert seen["first_full"] == 1  # compiled, launched and bound by Triton's run
    assert seen["second_full"] == 1  # new tensors, another float: the bound launcher
    assert seen["again_full"] == 0


def test_the_bound_launch_hands_the_launcher_what_tritons_run_does(seen):
    assert seen["same_as_triton"]


@pytest.mark.parametrize("change", ["unaligned", "n1", "dtype", "options"])
def test_what_changes_the_specialisation_takes_tritons_path(seen, change):
    # a pointer off 16 bytes, an integer equal to 1, another dtype, other launch options:
    # each is a specialisation (or may be) of its own, so Triton's run decides
    assert seen[f"{change}_full"] == 1


def test_a_constexpr_float_is_part_of_the_key(seen):
    assert seen["same_eps_full"] == 0
    assert seen["new_eps_full"] == 1


def test_launch_hooks_take_tritons_path(seen):
    if seen["hook_full"] is None:
        pytest.skip("this Triton keeps one launch hook callable, not a chain")
    assert seen["hook_full"] == 1
    assert seen["hook_called"] == 1


def test_bad_arguments_are_named(seen):
    assert seen["missing"] == "scale_kernel: missing argument 'alpha'"
    assert seen["unknown"] == "scale_kernel: no parameter named 'beta'"


def test_the_fused_loss_step_launches_only_bound_kernels(seen):
    # after a first step, every launch of the fused l2 loss (forward and backward) is bound;
    # 15 launches: the norm backwards take two (the inter-affinity terms' add into the
    # levels' gradients that the intra-affinity terms' write, so they launch after them)
    assert seen["step_launches"] == 15
    assert seen["step_full"] == 0


def test_a_replayed_fused_step_hands_the_launcher_what_the_host_code_does(seen):
    # the second step replays the recorded host program; the step with SNL_REPLAY=0 runs the
    # host code as written: the same kernels, grids, metadata and arguments, tensors alike
    assert seen["replayed_as_written"]
