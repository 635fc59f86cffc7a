"""Path and precision of the affinity products, decided once, here, for both kernel backends.

The ops take the decision as arguments (``grams`` and ``precision`` in the schemas of
``snl_triton::*_affinity_*`` and ``snl::*_affinity_*``); no kernel reads the environment.

Path (intra-affinity): the C x C Gram form for l2 with fewer channels than pixels, tiles of
Delta otherwise (``use_grams``). Forward and backward take the same path.

Precision of the products, asked (``requested``): ``SNL_DOT_PRECISION`` (read at each call)
if set, else chosen by ``dot_precision``:

- "tf32": one tensor-core product, operands rounded to nearest tf32; for l2 from
  ``TF32_MIN_ROWS`` rows of Delta (the measured errors: BENCHMARKS.md, Accuracy);
- "tf32x3": three tf32 products (about fp32); for l1, whose gradient sign(Delta) flips where
  rounding moves a small Delta across zero, and for small l2;
- "ieee": full fp32 products on the CUDA cores.

What each backend runs (``for_backend``), for an asked precision:

========  =================  ==========================================================
backend   product            runs
========  =================  ==========================================================
triton    every              as asked
cuda      intra l2, Gram     as asked, on cuBLAS (tf32 tensor cores for "tf32" and
                             "tf32x3" on sm_80 and newer, else "ieee")
cuda      intra l2, tiled    "tf32" as tf32 WMMA on sm_80 and newer, else fp32 FMA
                             ("ieee"); "tf32x3" as "ieee" (fp32 FMA: at least as
                             accurate, and the tiled kernels have no three-product path)
cuda      intra l1, inter    "ieee" (fp32 FMA kernels only)
========  =================  ==========================================================
"""

from __future__ import annotations

import torch

from . import _env

ENV_VAR = "SNL_DOT_PRECISION"
PRECISIONS = ("ieee", "tf32x3", "tf32")
# Fewest rows (and columns) of Delta for which one tf32 product keeps the l2 loss bar: the
# loss's rounding errors average over the N^2 entries, so fewer rows mean larger errors
# (BENCHMARKS.md, Accuracy).
TF32_MIN_ROWS = 256
# Precisions each kernel backend implements, by product ("intra-l2-gram": the Gram path;
# "intra-l2": tiles of Delta; "intra-l1", "inter").
BACKEND_PRECISIONS = {
    "triton": {"intra-l2-gram": PRECISIONS, "intra-l2": PRECISIONS, "intra-l1": PRECISIONS,
               "inter": PRECISIONS},
    "cuda": {"intra-l2-gram": PRECISIONS, "intra-l2": ("ieee", "tf32"), "intra-l1": ("ieee",),
             "inter": ("ieee",)},
}


def use_grams(channels: int, pixels: int, distance: str) -> bool:
    """Whether intra-affinity takes the C x C Gram form (l2 with fewer channels than pixels:
    2 C^2 N per Gram against N^2 C per Delta)."""
    return distance == "l2" and channels < pixels


def requested() -> str | None:
    """``SNL_DOT_PRECISION`` when set and not empty, checked; else None."""
    value = _env.get(ENV_VAR)
    if not value:
        return None
    if value not in PRECISIONS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def dot_precision(l1: bool, rows: int) -> str:
    """The asked precision: ``SNL_DOT_PRECISION`` if set, else "tf32" for l2 with ``rows >=
    TF32_MIN_ROWS`` and "tf32x3" otherwise. ``rows``: the smaller side of Delta (N for
    intra-affinity, min(C_a, C_b) for inter)."""
    value = requested()
    if value is None:
        return "tf32" if not l1 and rows >= TF32_MIN_ROWS else "tf32x3"
    return value


def for_backend(backend: str, product: str, precision: str,
                device: torch.device | None = None) -> str:
    """What ``backend`` runs for ``product`` ("intra-l2-gram", "intra-l2", "intra-l1" or
    "inter") when ``precision`` is asked (the table of the module docstring). ``device``: where
    the CUDA backend runs (tf32 needs sm_80 or newer)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    supported = BACKEND_PRECISIONS[backend][product]
    if precision in supported:
        if precision != "ieee" and backend == "cuda" and not _has_tf32(device):
            return "ieee"
        return precision
    return "ieee"  # fp32 FMA: at least as accurate as any precision the backend lacks


def _has_tf32(device: torch.device | None) -> bool:
    if device is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def intra_plan(backend: str, teacher: torch.Tensor, distance: str) -> tuple[bool, str]:
    """(grams, precision) of an intra-affinity call on (B, C, H, W) features."""
    _, C, H, W = teacher.shape
    N = H * W
    asked = dot_precision(distance == "l1", N)
    grams = use_grams(C, N, distance)
    product = "intra-l2-gram" if grams else f"intra-{distance}"
    return grams, for_backend(backend, product, asked, teacher.device)


def inter_plan(backend: str, teacher_a: torch.Tensor, teacher_b: torch.Tensor,
               distance: str) -> str:
    """Precision of an inter-affinity call."""
    asked = dot_precision(distance == "l1", min(teacher_a.shape[1], teacher_b.shape[1]))
    return for_backend(backend, "inter", asked, teacher_a.device)
