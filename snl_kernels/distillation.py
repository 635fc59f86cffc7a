"""SNL's distillation terms over all levels in one call, sharing what the separate ops recompute.

``snl_distillation_loss(teachers, students)`` returns, summed over the levels k (and over the
consecutive level pairs for the inter-affinity term):

- ``rd``: ``sum_k mean(sample_k)``, RD4AD's flattened cosine (DESIGN §2.1);
- ``channel``: ``sum_k mean(pixel_k)`` (L_ch), ``spatial``: ``sum_k mean(channel_k)`` (L_sp);
- ``intra``: ``sum_k intra_affinity_loss(T_k, S_k)`` (§2.2);
- ``inter``: ``sum_{k} inter_affinity_loss(T_k, T_{k+1}, S_k, S_{k+1})`` (§2.3),

exactly what the separate public ops give (they remain the specification, and the
reference path composes them). With the Triton backend the terms are one
``torch.autograd.Function`` in plain eager mode, and one registered op pair with the same
host code elsewhere (``torch.compile``, tracing, fake tensors: :mod:`.distillation_op`),
whose forward and backward call the kernels directly and share, per level:

- the per-pixel sums of squares that the cosine kernel forms anyway: it writes the pixels'
  inverse norms of the intra-affinity term from them (no kernel re-reads T and S for norms);
- the per-channel sums of squares: the cosine kernels' finish writes the inverse norms of
  the coarser level's channels in the inter-affinity term;
- the three cosine terms' means, which the cosine kernels form themselves (and whose 0-dim
  gradients the backward kernel takes as they are: no broadcast tensors on the host);
- the pooled finer level and its channels' inverse norms, formed once in the forward and
  saved for the backward;
- on the Gram path (intra-affinity l2 with C < N), the backward's Grams, which the forward's
  loss kernel writes from its own products when a gradient will be asked for;

and the gradients of every term for a level are added into one buffer, by the norm backward
and unpooling kernels themselves (no PyTorch additions of feature-sized tensors where the
layouts allow it). In automatic mode where no kernel backend runs (CPU tensors) the same
plan runs in PyTorch (:mod:`snl_kernels.shared_torch`). Elsewhere (the CUDA backend, an
explicit ``backend="torch"``, float64) the separate ops run, each with the given
``backend``. The norms from the cosine
sums are the same quantity as the separate ops' (``1 / max(|x|, eps)``) summed in another
order, so the two paths agree to float rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _env, _replay, _triton, checks, dispatch, precision, reference, shared_torch
from ._registration import fast_apply, plain_eager
from .cosine_distances import IMPLEMENTED as COSINE_IMPLEMENTED
from .cosine_distances import OP as COSINE_OP
from .cosine_distances import separate_means
from .inter_affinity_loss import IMPLEMENTED as INTER_IMPLEMENTED
from .inter_affinity_loss import OP as INTER_OP
from .inter_affinity_loss import delta_grad_job as inter_delta_grad_job
from .inter_affinity_loss import inter_affinity_loss
from .inter_affinity_loss import triton_backward_normalised as inter_normalised
from .intra_affinity_loss import IMPLEMENTED as INTRA_IMPLEMENTED
from .intra_affinity_loss import OP as INTRA_OP
from .intra_affinity_loss import _signs_shape as signs_shape
from .intra_affinity_loss import intra_affinity_loss, norm_job, tiled_grad_job
from .intra_affinity_loss import triton_backward_normalised as intra_normalised

OP = "snl_distillation_loss"
IMPLEMENTED: tuple[str, ...] = ("triton",)  # the shared path; CUDA runs the separate ops
TERMS = ("rd", "channel", "spatial", "intra", "inter")
_COSINE_TERMS = frozenset(("rd", "channel", "spatial"))
EPS = reference.EPS


def _pairs(levels: int) -> list[tuple[int, int]]:
    return [(k, k + 1) for k in range(levels - 1)]


def snl_distillation_loss(teachers: Sequence[Tensor], students: Sequence[Tensor],
                          terms: Sequence[str] = TERMS, intra_distance: str = "l2",
                          inter_distance: str = "l2",
                          backend: str | None = None) -> dict[str, Tensor]:
    """SNL's distillation terms over the levels (see the module doc).

    Args:
        teachers: per-level (B, C_k, H_k, W_k) teacher features, fine to coarse.
        students: the student's levels, same shapes, dtypes and devices.
        terms: which of ``TERMS`` to compute (the others are neither computed nor returned).
        intra_distance, inter_distance: "l2" or "l1".
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic). The
            shared path runs for "triton" (and in automatic mode where Triton runs on the
            inputs); otherwise the separate ops, each with this ``backend``.

    Returns:
        ``{term: 0-dim float32 tensor}`` for the requested terms.

    Raises:
        TypeError, ValueError: bad levels, terms or distances (the message names which).
        BackendUnavailableError: the requested backend cannot run here (with the reasons).
    """
    checks.check_levels(OP, teachers, students)
    terms = tuple(terms)
    unknown = [t for t in terms if t not in TERMS]
    if unknown or not terms:
        raise ValueError(f"{OP}: terms must be a non-empty subset of {TERMS}, got {terms!r}")
    checks.check_choice(OP, "intra_distance", intra_distance, ("l2", "l1"))
    checks.check_choice(OP, "inter_distance", inter_distance, ("l2", "l1"))
    if "inter" in terms and len(teachers) < 2:
        raise ValueError(f"{OP}: the inter term needs at least two levels, got {len(teachers)}")
    for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
        checks.check_features(OP, t, s, (f"teachers[{k}]", f"students[{k}]"))
    tensors = (*teachers, *students)
    if _triton_path(backend, tensors):
        grad = torch.is_grad_enabled()
        store = (2 if grad and any(t.requires_grad for t in teachers)
                 else 1 if grad and any(s.requires_grad for s in students) else 0)
        plan = (terms, intra_distance, inter_distance, len(teachers), store)
        if plain_eager(tensors):
            values = _apply_shared(plan, *tensors)
        else:  # compiling, tracing, fake tensors, dispatch modes: the registered op
            values = torch.ops.snl_triton.distillation_fwd(
                list(teachers), list(students), list(terms), intra_distance, inter_distance,
                store)[:len(terms)]
        return dict(zip(terms, values, strict=True))
    if _torch_shared(backend, tensors, terms):
        return shared_torch.distillation_terms(teachers, students, terms, intra_distance,
                                               inter_distance)
    return _separate(teachers, students, terms, intra_distance, inter_distance, backend)


def _triton_path(backend: str | None, tensors: Sequence[Tensor]) -> bool:
    """Whether the shared Triton path runs (in plain eager mode as :class:`_Shared`,
    otherwise as the registered op ``snl_triton::distillation_fwd``)."""
    requested = dispatch.requested_backend(backend)
    if requested not in (None, "triton"):
        return False
    why_not = ("float64 inputs run on the reference only"
               if any(t.dtype == torch.float64 for t in tensors) else None)
    chosen = dispatch.select_backend(OP, backend, tensors, IMPLEMENTED, prefer=IMPLEMENTED,
                                     why_not=why_not)
    return chosen == "triton"


def _torch_shared(backend: str | None, tensors: Sequence[Tensor], terms: Sequence[str]) -> bool:
    """Automatic mode where every separate op the terms need would run the reference."""
    if dispatch.requested_backend(backend) is not None or not shared_torch.applies(tensors):
        return False
    ops = [(op, implemented) for op, implemented, wanted in (
        (COSINE_OP, COSINE_IMPLEMENTED, {"rd", "channel", "spatial"}),
        (INTRA_OP, INTRA_IMPLEMENTED, {"intra"}), (INTER_OP, INTER_IMPLEMENTED, {"inter"}))
        if wanted & set(terms)]
    return all(dispatch.select_backend(op, None, tensors, implemented) == "torch"
               for op, implemented in ops)


def _separate(teachers, students, terms, intra_distance, inter_distance, backend):
    """The terms from the separate public ops (the specification)."""
    out: dict[str, Tensor] = {}
    if {"rd", "channel", "spatial"} & set(terms):
        means = separate_means(teachers, students, backend)
        for term, value in (("rd", means.sample_mean), ("channel", means.pixel_mean),
                            ("spatial", means.channel_mean)):
            if term in terms:
                out[term] = value
    if "intra" in terms:
        out["intra"] = torch.stack([intra_affinity_loss(t, s, intra_distance, backend=backend)
                                    for t, s in zip(teachers, students, strict=True)]).sum()
    if "inter" in terms:
        out["inter"] = torch.stack([
            inter_affinity_loss(teachers[a], teachers[b], students[a], students[b],
                                inter_distance, backend=backend)
            for a, b in _pairs(len(teachers))]).sum()
    return {term: out[term] for term in terms}


class _Shared(torch.autograd.Function):
    """The Triton path of :func:`snl_distillation_loss` (see the module doc)."""

    @staticmethod
    def forward(ctx, plan, *tensors):
        needs = ctx.needs_input_grad
        key = _key(plan, needs, tensors)
        leaves, spec = _FORWARD(key, _forward, tensors, plan)
        count = len(plan[0])
        ctx.plan, ctx.key, ctx.spec = plan, key, spec
        ctx.saved = leaves[count:]
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        return tuple(leaves[:count])

    @staticmethod
    def backward(ctx, *grads):
        key = ctx.key
        if key is not None:
            key = (key, torch.is_grad_enabled(),
                   *[None if g is None else (g.shape, g.stride(), g.dtype) for g in grads])
        saved = ctx.saved
        leaves, spec = _BACKWARD(key, _backward, (*ctx.saved_tensors, *saved, *grads),
                                 ctx.plan, ctx.needs_input_grad, len(saved), ctx.spec)
        return (None, *pytree.tree_unflatten(leaves, spec))


def _key(plan, needs, tensors) -> tuple:
    """What the fused loss's host code decides from, besides the plan: every input's layout,
    dtype, device and 16-byte alignment, which inputs want a gradient, the settings read on
    the way (product precision, Triton configuration, the cosine blocks' chooser)."""
    return (plan, needs, _env.get(precision.ENV_VAR), _env.get(_triton.CONFIG_VARIABLE),
            _triton.kernels("cosine_distances").blocks,
            *[(t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15) for t in tensors])


def _forward(tensors, plan, zero_signs=False):
    """The forward's host code: ``(values, saved)``, the terms' values and what the backward
    takes. ``zero_signs``: the l1 levels' sign words start at zero (the kernels write the
    upper triangle of tiles only; a registered op's outputs must not hold stale memory)."""
    ka, kc = _triton.kernels("affinity"), _triton.kernels("cosine_distances")

    # store: the Gram path's loss kernel also writes the backward's Grams when a gradient
    # will be asked for (2: the teacher's two too, where a teacher level requires one; 1:
    # the student's; 0: none), decided by the caller in grad mode (inside forward it is
    # always off).
    terms, intra_distance, inter_distance, levels, store = plan
    teachers, students = tensors[:levels], tensors[levels:]
    values: dict = {}
    saved: dict = {"cos": [], "r_pix": [], "r_chan": [], "signs": [], "pooled": [],
                   "intra_plan": [], "inter_plan": [], "grams": []}
    # The three cosine terms come out of the kernels summed over levels (the pixel, channel
    # and sample mean distances), with each level's sample sums for the backward, and the
    # inverse norms the affinity terms take from the kernels' sums of squares: the pixels'
    # for the intra-affinity term, the channels' for the inter-affinity term.
    norms = ("pixel",) * ("intra" in terms) + ("channel",) * ("inter" in terms)
    cos_levels, extra = kc.forward_levels(list(teachers), list(students), EPS,
                                          means=bool(_COSINE_TERMS & set(terms)), norms=norms)
    if extra["means"] is not None:
        values["channel"], values["spatial"], values["rd"] = extra["means"]
    for k, (_, _, _, p_stats, c_stats) in enumerate(cos_levels):
        saved["cos"].append((p_stats, c_stats, extra["sample_stats"][k]))
        saved["r_pix"].append(extra["pixel_norms"][k])
        saved["r_chan"].append(extra["channel_norms"][k])
    # The affinity terms' Deltas: every intra-affinity level on the tiled path and every
    # inter-affinity pair in as few launches as the grouped kernel takes (the Gram path's
    # levels in their own launch); the per-tile partial sums are added afterwards.
    jobs, finish = [], []
    if "intra" in terms:
        for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
            grams, dot = precision.intra_plan("triton", t, intra_distance)
            r_t, r_s = saved["r_pix"][k]
            B, _, H, W = t.shape
            l1 = intra_distance == "l1"
            make = t.new_zeros if zero_signs else t.new_empty
            signs = make(signs_shape("triton", t, intra_distance), dtype=torch.int32)
            saved["signs"].append(signs)
            saved["intra_plan"].append((grams, dot))
            scale = 1.0 / (B * (H * W) ** 2)
            if grams:
                part, stored = ka.gram_loss(s, t, r_s, r_t, dot, store)
                saved["grams"].append(stored)
                finish.append(("intra", part, scale))
            else:
                saved["grams"].append(None)
                jobs.append(dict(a_s=s, a_t=t, b_s=s, b_t=t, r_as=r_s, r_at=r_t, r_bs=r_s,
                                 r_bt=r_t, pix_rows=True, l1=l1, precision=dot,
                                 signs=signs if l1 else None))
                finish.append(("intra", len(jobs) - 1, scale))
    if "inter" in terms:
        pairs = _pairs(levels)
        # Every pair's finer level, teacher and student, pooled to the coarser level's
        # size with its channels' norms, in as few launches as the kernel takes.
        finer = [x for a, _ in pairs for x in (teachers[a], students[a])]
        sizes = [tuple(teachers[b].shape[-2:]) for _, b in pairs for _ in range(2)]
        pooled = ka.pool_with_norms(finer, sizes, EPS)
        for i, (a, b) in enumerate(pairs):
            (p_t, r_pt), (p_s, r_ps) = pooled[2 * i], pooled[2 * i + 1]
            r_qt, r_qs = saved["r_chan"][b]
            norms = (r_pt, r_ps, r_qt, r_qs)
            dot = precision.inter_plan("triton", teachers[a], teachers[b], inter_distance)
            saved["pooled"].append((p_t, p_s, norms))
            saved["inter_plan"].append(dot)
            jobs.append(dict(a_s=p_s, a_t=p_t, b_s=students[b], b_t=teachers[b],
                             r_as=r_ps, r_at=r_pt, r_bs=r_qs, r_bt=r_qt, pix_rows=False,
                             l1=inter_distance == "l1", precision=dot))
            scale = 1.0 / (teachers[a].shape[0] * teachers[a].shape[1]
                           * teachers[b].shape[1])
            finish.append(("inter", len(jobs) - 1, scale))
    parts = ka.delta_group(jobs)
    if finish:
        # Every part scaled in place in one launch, then per term one sum over its parts
        # (a sum, a product and an addition per part would be a launch each).
        scaled = [parts[part] if isinstance(part, int) else part for _, part, _ in finish]
        torch._foreach_mul_(scaled, [scale for _, _, scale in finish])
        for term in ("intra", "inter"):
            mine = [x.reshape(-1) for x, (name, _, _) in zip(scaled, finish, strict=True)
                    if name == term]
            if mine:
                values[term] = (mine[0] if len(mine) == 1 else torch.cat(mine)).sum()
    return tuple(values[term] for term in terms), saved


def _backward(inputs, plan, needs_input_grad, count, spec):
    """The backward's host code: from the inputs, the forward's saved leaves (``count``,
    structure ``spec``) and the upstream gradients, the inputs' gradients."""
    ka, kc = _triton.kernels("affinity"), _triton.kernels("cosine_distances")

    terms, intra_distance, inter_distance, levels, _ = plan
    tensors = inputs[:2 * levels]
    saved_leaves, grads = inputs[2 * levels:2 * levels + count], inputs[2 * levels + count:]
    saved = pytree.tree_unflatten([None] * len(terms) + list(saved_leaves), spec)[1]
    teachers, students = tensors[:levels], tensors[levels:]
    need_t = any(needs_input_grad[1:1 + levels])
    g = {term: grad for term, grad in zip(terms, grads, strict=True) if grad is not None}
    f32 = dict(dtype=torch.float32)
    grad_t: list = [None] * levels
    grad_s: list = [None] * levels

    def add(store, k, value):
        store[k] = value if store[k] is None else store[k].add_(value)

    if {"rd", "channel", "spatial"} & set(g):
        # The means' gradients as they are: the kernel spreads each as g / numel.
        missing = {"channel", "spatial", "rd"} - set(g)
        zero = teachers[0].new_zeros((), **f32) if missing else None
        upstream = [[g.get(term, zero)] * levels for term in ("channel", "spatial", "rd")]
        cos = kc.backward_levels(list(teachers), list(students),
                                 [p for p, _, _ in saved["cos"]],
                                 [c for _, c, _ in saved["cos"]], *upstream, need_t, EPS,
                                 sample_stats=[x for _, _, x in saved["cos"]], of_means=True)
        for k, (dt, ds) in enumerate(cos):
            add(grad_s, k, ds)
            if need_t:
                add(grad_t, k, dt)
    # The affinity terms' gradients for the normalised features, then every norm
    # backward in one launch (up to eight per launch), then the pooled ones unpooled.
    jobs, where = [], []
    if "intra" in g:
        # The Gram path's levels one by one; the tiled levels' gradients in one launch.
        normalised, tiled, tiled_levels = {}, [], []
        for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
            r_t, r_s = saved["r_pix"][k]
            grams, dot = saved["intra_plan"][k]
            if grams:
                normalised[k] = intra_normalised(t, s, r_t, r_s, g["intra"],
                                                 saved["signs"][k], intra_distance, grams,
                                                 dot, need_t, saved["grams"][k])
            else:
                tiled.append(tiled_grad_job(t, s, r_t, r_s, g["intra"], saved["signs"][k],
                                            intra_distance, dot, need_t))
                tiled_levels.append(k)
        for k, (g_s, g_t) in zip(tiled_levels, ka.intra_tiled_grad_group(tiled),
                                 strict=True):
            normalised[k] = (g_t, g_s)
        for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
            r_t, r_s = saved["r_pix"][k]
            g_t, g_s = normalised[k]
            jobs.append(norm_job(s, r_s, g_s))
            where.append((grad_s, k, None))
            if need_t:
                jobs.append(norm_job(t, r_t, g_t))
                where.append((grad_t, k, None))
    if "inter" in g:
        # The gradient of every pair's Delta in one launch (up to four per launch).
        grads_of_delta = ka.delta_group([
            inter_delta_grad_job(teachers[a], teachers[b], students[a], students[b],
                                 p_t, p_s, norms, g["inter"], inter_distance, dot)
            for (a, b), (p_t, p_s, norms), dot in zip(_pairs(levels), saved["pooled"],
                                                     saved["inter_plan"], strict=True)])
        mm, pending = [], []
        for (a, b), (p_t, p_s, norms), dot, gd in zip(
                _pairs(levels), saved["pooled"], saved["inter_plan"], grads_of_delta,
                strict=True):
            teacher_side, student_side = inter_normalised(
                teachers[a], teachers[b], students[a], students[b], p_t, p_s, norms,
                g["inter"], inter_distance, dot, need_t, gd=gd)
            for store, side in ((grad_s, student_side), (grad_t, teacher_side)):
                if side is not None:
                    mm += side[0]
                    pending.append((store, a, b, side))
        # Every pair's two products in one launch (up to four per launch).
        products = iter(ka.scaled_mm_group(mm))
        for store, a, b, (_, (p_job, q_job), f_a) in pending:
            jobs += [p_job(next(products)), q_job(next(products))]
            where += [(store, a, f_a), (store, b, None)]
    # Each level's norm backward adds into the level's gradient so far, in the kernel (the
    # cosine terms', then the terms' in ``where`` order, as the additions were written);
    # one whose layout the kernel cannot add into is added afterwards.
    late = []
    for i, (store, k, unpool_to) in enumerate(where):
        if unpool_to is not None:
            continue
        f, _, gx, _, out = jobs[i]
        acc = store[k]
        if acc is None:
            store[k] = gx if out is None else out
        elif acc.dtype == f.dtype and acc.stride() == gx.stride():
            jobs[i] = (f, jobs[i][1], gx, jobs[i][3], None, acc)
        else:
            late.append(i)
    grads = ka.norm_backward_group(jobs, EPS)
    for i in late:
        add(where[i][0], where[i][1], grads[i])
    # The pooled levels' gradients back to their finer levels, added into theirs (two per
    # launch).
    pooled = [(i, store, k) for i, (store, k, unpool_to) in enumerate(where)
              if unpool_to is not None]
    unpooled = ka.unpool_group([
        (grads[i], where[i][2],
         store[k] if store[k] is not None and store[k].dtype == where[i][2].dtype else None)
        for i, store, k in pooled])
    for (_, store, k), grad in zip(pooled, unpooled, strict=True):
        if store[k] is not grad:
            add(store, k, grad)
    out_t = [gt if need else None
             for gt, need in zip(grad_t, needs_input_grad[1:1 + levels], strict=True)]
    out_s = [gs if need else None
             for gs, need in zip(grad_s, needs_input_grad[1 + levels:], strict=True)]
    return (*out_t, *out_s)


_FORWARD = _replay.Programs("snl_distillation_loss forward")
_BACKWARD = _replay.Programs("snl_distillation_loss backward")
_apply_shared = fast_apply(_Shared)  # the caller has checked plain_eager
