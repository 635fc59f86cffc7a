"""The CUDA extension ``snl_kernels._C``: it imports and registers the ``torch.ops.snl`` schemas.

These run without a GPU. Where PyTorch is a CPU build they skip (the extension is not built
there); where it is a CUDA build and the extension does not import they skip with the import
error, unless ``SNL_REQUIRE_EXTENSION=1`` (set by CI in its CUDA environment), which turns that
into a failure. Kernel correctness is tested in each op's ``test_<op>.py``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from snl_kernels.dispatch import CUDA_OPS

SCHEMAS = {
    "cosine_distances_fwd": (
        "snl::cosine_distances_fwd(Tensor teacher, Tensor student) -> (Tensor pixel, "
        "Tensor channel, Tensor sample, Tensor pixel_stats, Tensor channel_stats)"
    ),
    "cosine_distances_bwd": (
        "snl::cosine_distances_bwd(Tensor teacher, Tensor student, Tensor pixel_stats, "
        "Tensor channel_stats, Tensor grad_pixel, Tensor grad_channel, Tensor grad_sample, "
        "bool teacher_requires_grad) -> (Tensor grad_teacher, Tensor grad_student)"
    ),
    # The affinity ops take the path and precision decided in snl_kernels/precision.py, with
    # the schemas of the Triton ops of the same names (snl_triton::).
    "intra_affinity_fwd": (
        "snl::intra_affinity_fwd(Tensor teacher, Tensor student, str distance, bool grams, "
        "str precision) -> (Tensor loss, Tensor signs)"
    ),
    "intra_affinity_bwd": (
        "snl::intra_affinity_bwd(Tensor teacher, Tensor student, Tensor grad_loss, Tensor signs, "
        "str distance, bool grams, str precision, bool teacher_requires_grad) -> "
        "(Tensor grad_teacher, Tensor grad_student)"
    ),
    "inter_affinity_fwd": (
        "snl::inter_affinity_fwd(Tensor teacher_a, Tensor teacher_b, Tensor student_a, "
        "Tensor student_b, str distance, str precision) -> Tensor"
    ),
    "inter_affinity_bwd": (
        "snl::inter_affinity_bwd(Tensor teacher_a, Tensor teacher_b, Tensor student_a, "
        "Tensor student_b, Tensor grad_loss, str distance, str precision, "
        "bool teacher_requires_grad) -> (Tensor grad_teacher_a, Tensor grad_teacher_b, "
        "Tensor grad_student_a, Tensor grad_student_b)"
    ),
}


@pytest.fixture(scope="module")
def extension():
    if torch.version.cuda is None:
        pytest.skip("PyTorch is a CPU build; the CUDA extension is not built")
    try:
        return importlib.import_module("snl_kernels._C")
    except Exception as exc:  # any failure to load (missing .so, bad symbol) reads the same
        reason = f"snl_kernels._C does not import: {type(exc).__name__}: {exc}"
        if os.environ.get("SNL_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"SNL_REQUIRE_EXTENSION=1, but {reason}")
        pytest.skip(f"{reason} (build it: pip install --no-build-isolation -e .)")


def test_extension_is_a_built_library(extension):
    assert extension.__file__.endswith(".so"), extension.__file__


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema(extension, name):
    assert str(getattr(torch.ops.snl, name).default._schema) == SCHEMAS[name]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_cuda_kernel_registered(extension, name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"snl::{name}", "CUDA")


@pytest.mark.parametrize("name", sorted(n for names in CUDA_OPS.values() for n in names))
def test_every_op_of_the_library_has_its_cuda_kernel(extension, name):
    # dispatch.CUDA_OPS lists the kernels behind each public op; a build that lacks one would
    # make the cuda backend of that op unavailable.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"snl::{name}", "CUDA")


def test_has_op_reads_the_dispatcher_once_and_traces_as_a_constant(extension):
    """``_cuda.has_op`` agrees with the dispatcher, and ``torch.compile(fullgraph=True)`` can
    trace through it (the backend choice runs it inside compiled code; the dispatcher query
    itself is untraceable)."""
    from snl_kernels import _cuda

    for name in SCHEMAS:
        assert _cuda.has_op(name), name
    assert not _cuda.has_op("no_such_op")
    assert not _cuda.has_op("cosine_distances_fwd.default")  # names, not overloads

    def pick(x):
        return x + 1 if _cuda.has_op("cram_fwd") else x - 1

    torch._dynamo.reset()
    assert torch.equal(torch.compile(pick, fullgraph=True)(torch.zeros(2)), torch.ones(2))


def test_fwd_has_no_cpu_kernel(extension):
    teacher = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="'CPU' backend"):
        torch.ops.snl.cosine_distances_fwd(teacher, teacher.clone())


def test_bwd_has_no_cpu_kernel(extension):
    B, C, H, W = 1, 2, 3, 4
    teacher = torch.randn(B, C, H, W)
    with pytest.raises(RuntimeError, match="'CPU' backend"):
        torch.ops.snl.cosine_distances_bwd(
            teacher,
            teacher.clone(),
            torch.zeros(B, 3, H * W),
            torch.zeros(B, 3, C),
            torch.zeros(B, H, W),
            torch.zeros(B, C),
            torch.zeros(B),
            True,
        )


@pytest.mark.parametrize("name", sorted(n for n in SCHEMAS if "affinity" in n))
def test_triton_affinity_ops_take_every_call_of_the_cuda_ops(name):
    # One contract for both kernel backends: Triton's ops take the CUDA ops' arguments and
    # give their outputs first; what they add (the forward's store and saved tensors, the
    # backward's saved argument) comes after, every added argument with a default.
    import snl_kernels  # noqa: F401  (registers the snl_triton ops)

    triton = getattr(torch.ops.snl_triton, name).default._schema
    cuda = torch._C.parse_schema(SCHEMAS[name])
    n_args, n_out = len(cuda.arguments), len(cuda.returns)
    assert [(a.name, str(a.type)) for a in triton.arguments[:n_args]] == [
        (a.name, str(a.type)) for a in cuda.arguments]
    assert triton.arguments[n_args:]
    assert all(a.has_default_value() for a in triton.arguments[n_args:])
    assert [str(r.type) for r in triton.returns[:n_out]] == [str(r.type) for r in cuda.returns]
    assert len(triton.returns) - n_out == (1 if name.endswith("fwd") else 0)
