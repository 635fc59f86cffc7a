"""The fused distillation loss as a registered op pair: opcheck, fullgraph compile keeping the
fused op, fake tensors, dispatch modes, and (on a GPU) Inductor and CUDA graphs."""

from __future__ import annotations

import os

import pytest
import torch
from support import DEVICE, NO_TRITON, requires_gpu
from torch.utils._python_dispatch import TorchDispatchMode

import snl_kernels
from snl_kernels import distillation, distillation_op

pytestmark = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")

# Gram form at the first level (C < N), Delta tiles at the others.
SHAPES = [(2, 8, 6, 6), (2, 12, 3, 3), (2, 16, 2, 2)]
TERMS = list(distillation.TERMS)
WEIGHTS = {"rd": 1.0, "channel": 0.7, "spatial": 0.5, "intra": 3.0, "inter": 2.0}
ns = torch.ops.snl_triton


def _levels(shapes=SHAPES, dtype=torch.float32, teacher_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    teachers, students = [], []
    for shape in shapes:
        t = torch.randn(shape, generator=g)
        s = t + 0.3 * torch.randn(shape, generator=g)
        teachers.append(t.to(DEVICE, dtype).requires_grad_(teacher_grad))
        students.append(s.to(DEVICE, dtype).requires_grad_(True))
    return teachers, students


def _loss(distance):
    def loss(teachers, students):
        out = snl_kernels.snl_distillation_loss(teachers, students, intra_distance=distance,
                                                inter_distance=distance, backend="triton")
        return sum(WEIGHTS[k] * v for k, v in out.items())

    return loss


class _Ops(TorchDispatchMode):
    """Records the names of the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _detached(xs):
    return [x.detach() for x in xs]


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_opcheck(distance):
    teachers, students = _levels(teacher_grad=True)
    t, s = _detached(teachers), _detached(students)
    torch.library.opcheck(ns.distillation_fwd.default, (teachers, students, TERMS, distance,
                                                        distance, 2))
    out = ns.distillation_fwd(t, s, TERMS, distance, distance, 2)
    saved = out[len(TERMS):]
    grads = [torch.tensor(g, device=DEVICE) if g is not None else None
             for g in (1.0, None, 0.5, 2.0, 3.0)]
    needs = [True, False, False, True, True, True]
    torch.library.opcheck(ns.distillation_bwd.default,
                          (t, s, saved, grads, TERMS, distance, distance, 2, needs))
    # channels_last inputs, a subset of terms, no Gram stored, bf16.
    t_cl = [x.contiguous(memory_format=torch.channels_last) for x in t]
    s_cl = [x.contiguous(memory_format=torch.channels_last).requires_grad_(True) for x in s]
    torch.library.opcheck(ns.distillation_fwd.default,
                          (t_cl, s_cl, ["inter", "rd"], distance, distance, 1))
    low = [x.to(torch.bfloat16) for x in (*t, *s)]
    out = ns.distillation_fwd(low[:3], low[3:], ["intra"], distance, distance, 1)
    torch.library.opcheck(ns.distillation_bwd.default,
                          (low[:3], low[3:], out[1:], [torch.tensor(1.0, device=DEVICE)],
                           ["intra"], distance, distance, 1, [False] * 3 + [True] * 3))


@pytest.mark.parametrize("batch", [1, 2])
def test_outputs_do_not_alias(batch):
    """The saved tensors are returned once each (the pooled pairs' norms are also the
    coarser levels' channel norms) and views come back as copies: no output shares
    storage with another or with an input (with B = 1 every level's norms are views of one
    tensor)."""
    teachers, students = _levels([(batch, *shape[1:]) for shape in SHAPES])
    out = ns.distillation_fwd(_detached(teachers), _detached(students), TERMS, "l1", "l1", 1)
    storages = [x.untyped_storage().data_ptr() for x in (*out, *teachers, *students)]
    assert len(set(storages)) == len(storages)
    assert all(x._base is None for x in out)


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_fullgraph_compile_keeps_the_fused_op(distance):
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    teachers, students = _levels(teacher_grad=distance == "l1")
    loss = _loss(distance)
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(loss, backend=counter, fullgraph=True)(teachers, students)
    inputs = [x for x in (*teachers, *students) if x.requires_grad]
    got_grads = torch.autograd.grad(got, inputs)
    want = loss(teachers, students)
    want_grads = torch.autograd.grad(want, inputs)
    code = counter.graphs[0].code
    assert code.count("snl_triton.distillation_fwd") == 1
    assert "intra_affinity" not in code
    assert "cosine_distances" not in code
    # The same kernels on the same inputs: the same values and gradients.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_spatial_channel_loss_compiles_to_the_fused_op():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    teachers, students = _levels()

    def loss(t, s):
        return sum(snl_kernels.spatial_channel_loss(t, s, backend="triton"))

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(loss, backend=counter, fullgraph=True)(teachers, students)
    assert "snl_triton.distillation_fwd" in counter.graphs[0].code
    torch.testing.assert_close(got, loss(teachers, students), rtol=1e-6, atol=0)


def test_a_dispatch_mode_runs_the_registered_op():
    """Under a dispatch mode (a flop counter, a tracer) the call takes the registered op
    pair, with plain eager's values and gradients."""
    teachers, students = _levels(teacher_grad=True)
    loss = _loss("l1")
    inputs = [*teachers, *students]
    want = loss(teachers, students)
    want_grads = torch.autograd.grad(want, inputs)
    with _Ops() as ops:
        got = loss(teachers, students)
        got_grads = torch.autograd.grad(got, inputs)
    assert "snl_triton.distillation_fwd.default" in ops.names
    assert "snl_triton.distillation_bwd.default" in ops.names
    assert not [n for n in ops.names if "intra_affinity" in n or "cosine_distances" in n]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_fake_tensors_take_the_op_and_give_the_real_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    teachers, students = _levels()
    t, s = _detached(teachers), _detached(students)
    real = ns.distillation_fwd(t, s, TERMS, "l2", "l1", 1)
    with FakeTensorMode() as fake:
        ft = [fake.from_tensor(x) for x in t]
        fs = [fake.from_tensor(x) for x in s]
        out = ns.distillation_fwd(ft, fs, TERMS, "l2", "l1", 1)
        terms = snl_kernels.snl_distillation_loss(ft, fs, inter_distance="l1",
                                                  backend="triton")
    assert [(x.shape, x.stride(), x.dtype) for x in out] == [
        (x.shape, x.stride(), x.dtype) for x in real]
    assert list(terms) == TERMS
    assert all(v.shape == () for v in terms.values())


def test_backward_of_an_unseen_layout_finds_the_saved_structure():
    """The backward op called for a layout whose forward it has not seen (the table
    cleared) rebuilds the saved state's structure from fake tensors: the same gradients."""
    teachers, students = _levels()
    t, s = _detached(teachers), _detached(students)
    out = ns.distillation_fwd(t, s, TERMS, "l1", "l2", 1)
    grads = [torch.tensor(w, device=DEVICE) for w in WEIGHTS.values()]
    args = (t, s, out[len(TERMS):], grads, TERMS, "l1", "l2", 1, [False] * 3 + [True] * 3)
    seen = ns.distillation_bwd(*args)
    distillation_op._structures.clear()
    unseen = ns.distillation_bwd(*args)
    assert len(distillation_op._structures) == 1
    for a, b in zip(seen, unseen, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@requires_gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_and_cuda_graphs_keep_the_fused_kernels(mode):
    torch._dynamo.reset()
    teachers, students = _levels()
    loss = _loss("l2")
    compiled = torch.compile(loss, fullgraph=True, mode=mode)
    for _ in range(3):  # CUDA graphs record on a later call
        got = compiled(teachers, students)
        grads = torch.autograd.grad(got, students)
    want = loss(teachers, students)
    for a, b in zip(grads, torch.autograd.grad(want, students), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_compiling_first_in_a_fresh_process(tmp_path):
    """A process whose first call of the fused loss is compiled (the kernel modules not
    imported yet): Dynamo's guards must not depend on the imports that tracing does."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "first.py"
    script.write_text(
        "import sys, torch, snl_kernels\n"
        "t = [torch.randn(2, 8, 6, 6, device=sys.argv[1]),\n"
        "     torch.randn(2, 12, 3, 3, device=sys.argv[1])]\n"
        "s = [(x + 0.1).requires_grad_(True) for x in t]\n"
        "def loss(t, s):\n"
        "    return sum(snl_kernels.snl_distillation_loss(t, s, backend='triton').values())\n"
        "out = torch.compile(loss, backend='aot_eager', fullgraph=True)(t, s)\n"
        "torch.autograd.grad(out, s)\n"
        "torch.testing.assert_close(out, loss(t, s))\n"
        "print('ok')\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1" if DEVICE == "cpu" else "0",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), DEVICE], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
