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
- ``autograd-floor``: no library code, a bare ``torch.autograd.Function`` of the eager path's
  form with the op's three differentiable outputs and four saved tensors, applied through
  the C++ ``apply``: what
  PyTorch's autograd bookkeeping alone costs for such an op (``public-grad`` minus this is
  the library's own host work with autograd).

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
PROVIDERS = ["body", "registered-op", "public-grad", "public-no-grad", "autograd-floor"]


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
def test_host_overhead_cosine(benchmark, no_op_launches, provider):
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
    out = call()
    assert out[0].shape == (1, 2, 2)
    benchmark.pedantic(call, rounds=2000, iterations=20, warmup_rounds=50)
    benchmark.extra_info.update(provider=provider, device=DEVICE)
