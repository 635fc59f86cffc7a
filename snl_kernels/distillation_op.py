"""The fused distillation loss as a registered op pair: what ``torch.compile``, tracing and
fake tensors run.

In plain eager mode :func:`snl_kernels.snl_distillation_loss` runs its Triton path as a
``torch.autograd.Function`` (``distillation._Shared``). Everywhere else (``torch.compile``,
``torch.jit.trace``, dispatch modes such as fake tensors, ``opcheck`` or flop counters) the
same host code runs as two custom ops with fake implementations and registered autograd, so
that Dynamo, AOTAutograd and Inductor (and the CUDA graphs of ``mode="reduce-overhead"``)
keep the fused kernels instead of falling back to the separate ops:

- ``snl_triton::distillation_fwd(teachers, students, terms, intra_distance,
  inter_distance, store) -> Tensor[]``: the requested terms' values (0-dim float32), then
  the tensors the backward takes (the forward's saved state, flattened, each tensor once;
  the l1 levels' sign words zeroed where the kernels write none, so that no output holds
  stale memory);
- ``snl_triton::distillation_bwd(teachers, students, saved, grads, terms, intra_distance,
  inter_distance, store, needs) -> Tensor[]``: the gradients of the inputs whose ``needs``
  flag is set, teachers then students, in order.

``store`` says which Grams the Gram path's loss kernel keeps for the backward (0: none, 1:
the student's, 2: the teacher's too), decided by the caller from grad mode and the inputs'
``requires_grad``.

The saved state's structure (which tensors each level keeps) and its non-tensor parts (the
levels' product plans) follow from the inputs' shapes, strides, dtypes and the settings;
the forward remembers them per layout, and the backward finds a layout it has not seen by
running the forward's host code on fake tensors. The fake implementations are the host code
itself, run on the fake tensors with kernel launches switched off
(:func:`snl_kernels._replay.no_launches`), so the outputs' shapes, dtypes and strides are
the kernels' own by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree

from . import _env, _replay, _triton, distillation, precision

FWD = "snl_triton::distillation_fwd"
BWD = "snl_triton::distillation_bwd"
FWD_SCHEMA = ("(Tensor[] teachers, Tensor[] students, str[] terms, str intra_distance, "
              "str inter_distance, int store) -> Tensor[]")
BWD_SCHEMA = ("(Tensor[] teachers, Tensor[] students, Tensor[] saved, Tensor?[] grads, "
              "str[] terms, str intra_distance, str inter_distance, int store, bool[] needs) "
              "-> Tensor[]")
#: Layouts whose saved-state structure is remembered before the table starts again.
MAX_LAYOUTS = 256

_structures: dict[tuple, tuple] = {}


class _Slot(int):
    """A tensor's place among the op's saved outputs, in a saved-state template."""


def _plan(terms, intra_distance, inter_distance, levels, store) -> tuple:
    return (tuple(terms), intra_distance, inter_distance, levels, store)


def _fake(tensors: Sequence[Tensor]) -> bool:
    """Whether the inputs carry no data (fake or meta tensors): no kernel can run."""
    return any(isinstance(t, FakeTensor) or t.is_meta for t in tensors)


def _layout_key(plan, tensors) -> tuple:
    """What the forward's host code decides the saved state's structure from."""
    return (plan, _env.get(precision.ENV_VAR), _env.get(_triton.CONFIG_VARIABLE),
            _triton.kernels("cosine_distances").blocks,
            *[(t.shape, t.stride(), t.dtype, t.device) for t in tensors])


def _split(leaves: list) -> tuple[list[Tensor], list]:
    """(the distinct tensors among the saved state's leaves, the template that puts them
    back). A tensor that appears twice is returned once; a view is returned as a copy (the
    outputs of an op may not alias each other)."""
    tensors: list[Tensor] = []
    where: dict[int, _Slot] = {}
    template = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            slot = where.get(id(leaf))
            if slot is None:
                slot = where[id(leaf)] = _Slot(len(tensors))
                tensors.append(leaf if leaf._base is None else leaf.clone())
            template.append(slot)
        else:
            template.append(leaf)
    return tensors, template


def _join(template: list, tensors: Sequence[Tensor]) -> list:
    return [tensors[x] if type(x) is _Slot else x for x in template]


def _forward_fake(tensors, plan) -> tuple[list, object]:
    """The forward's host code on fake tensors, no kernel launched: (leaves, spec)."""
    with _replay.no_launches():
        return pytree.tree_flatten(distillation._forward(tensors, plan, True))


def _structure(plan, tensors) -> tuple:
    """(spec, template) of the forward's saved state for these inputs."""
    if _fake(tensors):
        leaves, spec = _forward_fake(tensors, plan)
        return spec, _split(leaves[len(plan[0]):])[1]
    key = _layout_key(plan, tensors)
    found = _structures.get(key)
    if found is None:
        mode = FakeTensorMode()
        with mode:
            fakes = [mode.from_tensor(t) for t in tensors]
            leaves, spec = _forward_fake(fakes, plan)
        found = _remember(key, spec, leaves[len(plan[0]):])
    return found


def _remember(key, spec, saved_leaves) -> tuple:
    if len(_structures) >= MAX_LAYOUTS:
        _structures.clear()
    found = _structures[key] = (spec, _split(saved_leaves)[1])
    return found


def _fwd(teachers: list[Tensor], students: list[Tensor], terms: list[str],
         intra_distance: str, inter_distance: str, store: int) -> list[Tensor]:
    tensors = (*teachers, *students)
    plan = _plan(terms, intra_distance, inter_distance, len(teachers), store)
    count = len(terms)
    if _fake(tensors):
        leaves, _ = _forward_fake(tensors, plan)
    else:
        leaves, spec = distillation._FORWARD(distillation._key(plan, "op", tensors),
                                             distillation._forward, tensors, plan, True)
        key = _layout_key(plan, tensors)
        if key not in _structures:
            _remember(key, spec, leaves[count:])
    return [*leaves[:count], *_split(leaves[count:])[0]]


def _bwd(teachers: list[Tensor], students: list[Tensor], saved: list[Tensor],
         grads: list[Tensor | None], terms: list[str], intra_distance: str,
         inter_distance: str, store: int, needs: list[bool]) -> list[Tensor]:
    tensors = (*teachers, *students)
    plan = _plan(terms, intra_distance, inter_distance, len(teachers), store)
    spec, template = _structure(plan, tensors)
    leaves = _join(template, saved)
    inputs = (*tensors, *leaves, *grads)
    needs_input_grad = (None, *needs)  # as a Function's: the plan's place first
    if _fake(tensors):
        with _replay.no_launches():
            out = distillation._backward(inputs, plan, needs_input_grad, len(leaves), spec)
    else:
        key = (distillation._key(plan, ("op", *needs), tensors), torch.is_grad_enabled(),
               *[None if g is None else (g.shape, g.stride(), g.dtype) for g in grads])
        out_leaves, out_spec = distillation._BACKWARD(
            key, distillation._backward, inputs, plan, needs_input_grad, len(leaves), spec)
        out = pytree.tree_unflatten(out_leaves, out_spec)
    # Every needed gradient is formed when any term's gradient is given; with none given
    # (every upstream gradient None) they are zero.
    return [torch.zeros_like(x, memory_format=torch.contiguous_format) if g is None else g
            for g, x, need in zip(out, tensors, needs, strict=True) if need]


def _setup_context(ctx, inputs, output) -> None:
    teachers, students, terms, intra_distance, inter_distance, store = inputs
    saved = output[len(terms):]
    ctx.args = (list(terms), intra_distance, inter_distance, store)
    ctx.levels = len(teachers)
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*teachers, *students, *saved)


def _backward(ctx, grads):
    levels = ctx.levels
    stored = ctx.saved_tensors
    needs_t, needs_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    needs = [bool(n) for n in (*needs_t, *needs_s)]
    none = (None, None, None, None)
    if not any(needs):
        return ([None] * levels, [None] * levels, *none)
    out = iter(torch.ops.snl_triton.distillation_bwd(
        list(stored[:levels]), list(stored[levels:2 * levels]), list(stored[2 * levels:]),
        list(grads[:len(ctx.args[0])]), *ctx.args, needs))
    flat = [next(out) if need else None for need in needs]
    return (flat[:levels], flat[levels:], *none)


torch.library.custom_op(FWD, _fwd, mutates_args=(), schema=FWD_SCHEMA)
torch.library.custom_op(BWD, _bwd, mutates_args=(), schema=BWD_SCHEMA)
# The bodies take fake tensors themselves (the host code with launches switched off).
torch.library.register_fake(FWD)(_fwd)
torch.library.register_fake(BWD)(_bwd)
torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)
