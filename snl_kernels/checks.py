"""Input checks shared by the reference ops and the kernel launchers.

Every message names the op, the argument and the offending value, so that a user can fix
the call without reading the source. Type problems raise ``TypeError``; shapes, devices,
sizes and option values raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_tensor(op: str, name: str, x: object, ndim: int, layout: str) -> Tensor:
    """Check that ``x`` is a non-empty floating tensor with ``ndim`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must be a {ndim}-D tensor {layout}, got shape {_shape(x)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} is empty, shape {_shape(x)}")
    return x


def check_same(op: str, names: Sequence[str], tensors: Sequence[Tensor], what: str) -> None:
    """Check that ``tensors`` agree in ``what`` ("shape", "dtype", "device" or "batch")."""
    get = {
        "shape": _shape,
        "dtype": lambda t: t.dtype,
        "device": lambda t: t.device,
        "batch": lambda t: t.shape[0],
    }[what]
    first = get(tensors[0])
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if get(t) != first:
            raise ValueError(
                f"{op}: {names[0]} and {name} must have the same {what}, "
                f"got {first} and {get(t)}"
            )


def check_features(op: str, teacher: object, student: object,
                   names: tuple[str, str] = ("teacher", "student")) -> None:
    """Check a teacher/student pair of (B, C, H, W) feature maps."""
    # The common case in a few attribute reads (this runs on every op call); anything else
    # goes through the checks that name the problem.
    if type(teacher) is Tensor and type(student) is Tensor:
        dtype, shape = teacher.dtype, teacher.shape
        if (dtype is student.dtype and dtype in _FLOAT_DTYPE_SET and len(shape) == 4
                and shape == student.shape and 0 not in shape
                and teacher.device == student.device):
            return
    check_tensor(op, names[0], teacher, 4, "(B, C, H, W)")
    check_tensor(op, names[1], student, 4, "(B, C, H, W)")
    pair = [teacher, student]
    check_same(op, names, pair, "device")
    check_same(op, names, pair, "dtype")
    check_same(op, names, pair, "shape")


def check_levels(op: str, teachers: object, students: object) -> None:
    """Check lists of per-level teacher and student features (same length, same batch)."""
    for name, levels in (("teachers", teachers), ("students", students)):
        if isinstance(levels, Tensor) or not isinstance(levels, Sequence):
            raise TypeError(
                f"{op}: {name} must be a list or tuple of (B, C, H, W) tensors, "
                f"got {type(levels).__name__}"
            )
        if len(levels) == 0:
            raise ValueError(f"{op}: {name} is an empty list; give at least one level")
    assert isinstance(teachers, Sequence)
    assert isinstance(students, Sequence)
    if len(teachers) != len(students):
        raise ValueError(
            f"{op}: teachers and students must have the same number of levels, "
            f"got {len(teachers)} and {len(students)}"
        )
    for k, (t, s) in enumerate(zip(teachers, students, strict=True)):
        check_features(op, t, s, (f"teachers[{k}]", f"students[{k}]"))
    names = [f"teachers[{k}]" for k in range(len(teachers))]
    check_same(op, names, list(teachers), "batch")
    check_same(op, names, list(teachers), "device")


def check_choice(op: str, name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def check_size(op: str, size: object) -> tuple[int, int]:
    """Normalise an output size given as an int or an (H, W) pair of positive ints."""
    if isinstance(size, bool):
        raise TypeError(f"{op}: size must be an int or an (H, W) pair of ints, got {size!r}")
    if isinstance(size, int):
        pair: tuple[object, ...] = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = tuple(size)
    else:
        raise TypeError(f"{op}: size must be an int or an (H, W) pair of ints, got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{op}: size must be an int or an (H, W) pair of ints, got {size!r}")
    height, width = pair  # type: ignore[misc]
    if height <= 0 or width <= 0:
        raise ValueError(f"{op}: size must be positive, got {size!r}")
    return height, width


def check_sigma(op: str, sigma: object) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"{op}: sigma must be a number, got {sigma!r}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"{op}: sigma must be finite and >= 0 (0 means no blur), got {sigma!r}")
    return float(sigma)


def check_cram(op: str, embedding: object, centers: object, log_tau: object) -> None:
    check_tensor(op, "embedding", embedding, 4, "(B, D, h, w)")
    if not isinstance(centers, Tensor):
        raise TypeError(f"{op}: centers must be a torch.Tensor, got {type(centers).__name__}")
    if centers.dim() != 2:
        raise ValueError(f"{op}: centers must be a 2-D tensor (K, D), got shape {_shape(centers)}")
    if centers.shape[0] == 0:
        raise ValueError(f"{op}: centers must hold at least one centre (K >= 1), got K=0")
    check_tensor(op, "centers", centers, 2, "(K, D)")
    assert isinstance(embedding, Tensor)
    if centers.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"{op}: centers have width D={centers.shape[1]} but embedding has "
            f"D={embedding.shape[1]} channels"
        )
    check_same(op, ("embedding", "centers"), [embedding, centers], "device")
    if isinstance(log_tau, Tensor):
        if log_tau.numel() != 1:
            raise ValueError(
                f"{op}: log_tau must be a scalar (one element), got shape {_shape(log_tau)}"
            )
        if not log_tau.is_floating_point():
            raise TypeError(f"{op}: log_tau must be a floating tensor, got {log_tau.dtype}")
        if log_tau.device != embedding.device and log_tau.dim() != 0:
            raise ValueError(
                f"{op}: log_tau is on {log_tau.device} but embedding is on {embedding.device}"
            )
    elif isinstance(log_tau, bool) or not isinstance(log_tau, (int, float)):
        raise TypeError(f"{op}: log_tau must be a float or a 0-dim tensor, got {log_tau!r}")
    elif not math.isfinite(log_tau):
        raise ValueError(f"{op}: log_tau must be finite, got {log_tau!r}")


def check_inter(op: str, teacher_a: object, teacher_b: object, student_a: object,
                student_b: object, distance: object) -> None:
    """Check the two levels of an inter-affinity pair (b no finer than a)."""
    check_features(op, teacher_a, student_a, ("teacher_a", "student_a"))
    check_features(op, teacher_b, student_b, ("teacher_b", "student_b"))
    assert isinstance(teacher_a, Tensor)
    assert isinstance(teacher_b, Tensor)
    check_same(op, ("teacher_a", "teacher_b"), [teacher_a, teacher_b], "batch")
    check_same(op, ("teacher_a", "teacher_b"), [teacher_a, teacher_b], "device")
    check_same(op, ("teacher_a", "teacher_b"), [teacher_a, teacher_b], "dtype")
    check_choice(op, "distance", distance, ("l2", "l1"))
    (h_a, w_a), (h_b, w_b) = teacher_a.shape[-2:], teacher_b.shape[-2:]
    if h_b > h_a or w_b > w_a:
        raise ValueError(
            f"{op}: level b must not be finer than level a, got teacher_a spatial size "
            f"{(h_a, w_a)} and teacher_b {(h_b, w_b)}"
        )
