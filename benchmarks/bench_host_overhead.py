"""Host time of one op call, with the Triton launches replaced by a no-op (issue #16 part 3).

How it is measured: the Triton launcher functions (``snl_kernels._triton.<op>.forward`` and
``backward``) are replaced by functions that return preallocated outputs at once, so what is
left is everything the library does on the host around a launch: the input checks, the
backend choice, the eager path or the ``torch.library`` dispatch, and autograd's
bookkeeping. Tiny tensors (1 x 4 x 2 x 2) keep PyTorch's own per-op costs out of it.
Providers:

- ``body``: the no-op launcher itself (the floor);
- ``registered-op``: the ``torch.library`` op as ``torch.compile`` sees it (dispatcher and
  Python autograd kernel), with autograd;
- ``public-grad`` / ``public-no-grad``: ``snl_kernels.cosine_distances(..., backend="triton")``
  as user code calls it, an input requiring grad or under ``torch.no_grad()``;
- ``public-grad-env``: as ``public-grad`` with ``backend=None`` and ``SNL_BACKEND=triton``,
  as the model calls the ops (the variable is read on every call);
- ``autograd-floor``: no library code, a bare ``torch.autograd.Function`` of the eager path's
  form with the op's three differentiable outputs and four saved tensors, applied through
  the C++ ``apply``: what
  PyTorch's autograd bookkeeping alone costs for such an op (``public-grad`` minus this is
  the library's own host work with autograd).

The CUDA backend's path (``test_host_overhead_cuda_path``, where the extension is built): the
extension's ``snl::cosine_distances_fwd`` / ``_bwd`` get a CPU kernel that returns
preallocated outputs (a Python kernel registered for this process only) and the tensors are
CPU tensors, so the same host path runs with the kernel replaced, on any machine; the device
scan is told the tensors are CUDA tensors and the backend is ready, so that the public op
takes the CUDA backend. Providers: ``cuda-kernel`` (the no-op kernel through the dispatcher
below autograd: the launch, the floor), ``cuda-registered`` (the op through the dispatcher
with its registered autograd, the path the CUDA backend took before it had an eager path),
``cuda-public-grad`` and ``cuda-public-no-grad`` (``snl_kernels.cosine_distances(...,
backend="cuda")``).

The issue's bar is 10 us per op call on top of the launch; BENCHMARKS.md records the numbers.
On a CPU the kernels need the interpreter, which this module switches on before importing
them (only the launch plans differ, and they are replaced).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the Triton backend needs triton")

import snl_kernels
from snl_kernels._triton import cosine_distances as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["body", "registered-op", "public-grad", "public-grad-env", "public-no-grad",
             "autograd-floor"]
CUDA_PROVIDERS = ["cuda-kernel", "cuda-registered", "cuda-public-grad", "cuda-public-no-grad"]


@pytest.fixture
def no_op_launches(monkeypatch):
    """The cosine launchers return preallocated outputs: only host work remains."""
    teacher = torch.randn(1, 4, 2, 2, device=DEVICE)
    student = torch.randn(1, 4, 2, 2, device=DEVICE, requires_grad=True)
    outputs = kernels.forward(teacher, student.detach(), 1e-8)
    grads = (torch.zeros_like(teacher), torch.zeros_like(student))
    monkeypatch.setattr(kernels, "forward", lambda t, s, eps: outputs)
    monkeypatch.setattr(kernels, "backward", lambda *args: grads)
    if os.environ.get("SNL_BACKEND"):
        monkeypatch.delenv("SNL_BACKEND")
    return teacher, student


@pytest.mark.parametrize("provider", PROVIDERS)
def test_host_overhead_cosine(benchmark, no_op_launches, monkeypatch, provider):
    teacher, student = no_op_launches
    if provider == "body":
        def call():
            return kernels.forward(teacher, student, 1e-8)
    elif provider == "registered-op":
        def call():
            return torch.ops.snl_triton.cosine_distances_fwd(teacher, student)
    elif provider == "public-grad":
        def call():
            return snl_kernels.cosine_distances(teacher, student, backend="triton")
    elif provider == "public-grad-env":
        monkeypatch.setenv("SNL_BACKEND", "triton")

        def call():
            return snl_kernels.cosine_distances(teacher, student)
    elif provider == "public-no-grad":
        def call():
            with torch.no_grad():
                return snl_kernels.cosine_distances(teacher, student, backend="triton")
    else:
        outputs = kernels.forward(teacher, student.detach(), 1e-8)

        class Floor(torch.autograd.Function):
            # The form of the eager path's Function (_registration.eager_function): forward
            # takes ctx, saves the four tensors, materialises no gradients.
            @staticmethod
            def forward(ctx, t, s):
                ctx.save_for_backward(t, s, *outputs[3:])
                ctx.set_materialize_grads(False)
                return outputs[:3]

            @staticmethod
            def backward(ctx, *grads):
                return None, None

        apply = super(torch.autograd.Function, Floor).apply

        def call():
            return apply(teacher, student)
    _run(benchmark, call, provider, DEVICE)


def _run(benchmark, call, provider, device):
    out = call()
    assert out[0].shape == (1, 2, 2)
    benchmark.pedantic(call, rounds=2000, iterations=20, warmup_rounds=50)
    benchmark.extra_info.update(provider=provider, device=device)


@pytest.fixture
def no_op_cuda_kernels(monkeypatch):
    """The extension's cosine ops get a no-op CPU kernel; the tensors count as CUDA tensors."""
    from snl_kernels import _cuda, dispatch

    if not _cuda.has_op("cosine_distances_fwd"):
        pytest.skip("the CUDA extension is not built")
    teacher = torch.randn(1, 4, 2, 2)
    student = torch.randn(1, 4, 2, 2, requires_grad=True)
    outputs = (torch.zeros(1, 2, 2), torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, 3, 4),
               torch.zeros(1, 3, 4))
    grads = (torch.zeros_like(teacher), torch.zeros_like(student))
    library = torch.library.Library("snl", "IMPL")  # deregistered when the fixture ends
    library.impl("cosine_distances_fwd", lambda t, s: outputs, "CPU")
    library.impl("cosine_distances_bwd", lambda *args: grads, "CPU")
    monkeypatch.setattr(dispatch, "_devices", lambda tensors: dispatch._ONLY_CUDA)
    monkeypatch.setattr(dispatch, "_cuda_ready", frozenset(dispatch.CUDA_OPS))
    if os.environ.get("SNL_BACKEND"):
        monkeypatch.delenv("SNL_BACKEND")
    yield teacher, student
    del library


@pytest.mark.parametrize("provider", CUDA_PROVIDERS)
def test_host_overhead_cuda_path(benchmark, no_op_cuda_kernels, provider):
    teacher, student = no_op_cuda_kernels
    op = torch.ops.snl.cosine_distances_fwd
    if provider == "cuda-kernel":
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        detached = student.detach()

        def call():
            return op.default.redispatch(keys, teacher, detached)
    elif provider == "cuda-registered":
        def call():
            return op(teacher, student)
    elif provider == "cuda-public-grad":
        def call():
            return snl_kernels.cosine_distances(teacher, student, backend="cuda")
    else:
        def call():
            with torch.no_grad():
                return snl_kernels.cosine_distances(teacher, student, backend="cuda")
    _run(benchmark, call, provider, "cpu")
