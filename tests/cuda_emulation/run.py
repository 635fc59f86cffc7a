"""CPU emulation of the CUDA kernels, checked against the float64 reference.

Builds each driver (``tests/cuda_emulation/<op>.cpp``: the kernels of ``csrc/*_kernels.cuh``
run by the launches the extension makes, on the emulation of ``include/cuda_emulation.h``)
with g++, runs it on small cases and compares every output with ``snl_kernels.reference`` in
float64. Affinity: the loss to ``LOSS_RTOL`` (relative) and each gradient to ``GRAD_RTOL``
(norm of the difference over the norm of the reference, plus an absolute floor), the bar of
tests/test_affinity.py; the launch sequences are csrc/affinity_launch.cuh's, shared with the
extension. Cosine distances: each output elementwise, each gradient norm-wise; the driver
repeats the .cu file's launches. CRAM: the row kernels inside csrc/cram_host.h's
composition, whose cuBLAS products are plain loops in the driver (the composition itself is
tested through its CPU registration, tests/test_cram.py). Anomaly map: the per-level
distance kernel against the reference's pixel distance, the combine and score kernels
against the operators' products in float64.
No GPU, no CUDA toolkit, no extension build needed::

    python -m tests.cuda_emulation            # all cases; exit status 1 if any fails
    python -m tests.cuda_emulation -k tiled   # cases whose name contains "tiled"
    python -m tests.cuda_emulation --save out.pt   # also keep the raw outputs (bit checks)

Built with ``-O2 -ffp-contract=fast -fno-tree-vectorize`` (and ``-mfma`` on x86 CPUs that
have it), so products and sums contract to FMAs as nvcc's do; the bits may still differ from a
GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cuda_emulation"

LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_ATOL = 1e-6  # floor for gradients whose reference is (near) zero


def compiler() -> str | None:
    """The C++ compiler: $CXX, else g++ on PATH; None when there is none."""
    return os.environ.get("CXX") or shutil.which("g++")


def _cpu_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def compile_flags() -> list[str]:
    # No vectorisation: a product computed in a vector register is not contracted into the
    # scalar sum that follows, and which ones are depends on how g++ sees the loop; scalar
    # code contracts every a * b + c, as nvcc does, so a refactor keeps the emulated bits.
    flags = ["-std=c++17", "-O2", "-ffp-contract=fast", "-fno-tree-vectorize", "-Wall",
             "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-Wno-unused-function",
             "-Wno-sign-compare"]
    if platform.machine() in ("x86_64", "AMD64") and _cpu_has_fma():
        flags.append("-mfma")
    return [*flags, f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{CSRC}"]


#: Extra flags of a counting build: every load and store of the driver's code calls
#: count.cpp's hooks (g++'s address-sanitizer instrumentation in callback mode, none of its
#: run-time), and each launch reports to them (SNL_EMU_COUNT).
COUNT_FLAGS = ["-DSNL_EMU_COUNT", "-fsanitize=kernel-address",
               "--param", "asan-instrumentation-with-call-threshold=0",
               "--param", "asan-globals=0", "--param", "asan-stack=0"]


def build(op: str, counting: bool = False) -> Path:
    """Compile the driver of ``op`` (cached by the hash of its sources and flags);
    ``counting``: the build that reports each launch's bytes (count.cpp)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler: install g++ or set CXX")
    flags = [*compile_flags(), *(COUNT_FLAGS if counting else [])]
    sources = sorted([*CSRC.glob("*.cuh"), *CSRC.glob("*.h"), *HERE.glob("*.h"),
                      *(HERE / "include").glob("*.h"), HERE / f"{op}.cpp",
                      *([HERE / "count.cpp"] if counting else [])])
    digest = hashlib.sha256()
    for part in [cxx, *flags]:
        digest.update(part.encode())
    for path in sources:
        digest.update(path.name.encode() + path.read_bytes())
    exe = BUILD / f"{op}{'-count' if counting else ''}-{digest.hexdigest()[:16]}"
    if not exe.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        # A file of this process's own: test workers may build the same driver at once, and
        # the rename below is atomic.
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        cmds = [[cxx, *flags, str(HERE / f"{op}.cpp"), "-o", str(tmp)]]
        if counting:  # the hooks themselves without instrumentation
            hooks = tmp.with_suffix(".hooks.o")
            cmds = [[cxx, *compile_flags(), "-c", str(HERE / "count.cpp"), "-o", str(hooks)],
                    [*cmds[0][:-2], str(hooks), "-ldl", "-o", str(tmp)]]
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building the {op} driver failed:\n{' '.join(cmd)}\n"
                                   f"{done.stderr}")
        if counting:
            hooks.unlink()
        tmp.replace(exe)
    return exe


def _storage(x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Strides and the float32 storage of x (dense, any order of dimensions)."""
    if x.dtype != torch.float32 or x.storage_offset() != 0:
        raise ValueError(f"the drivers take float32 tensors at storage offset 0, got {x.dtype} "
                         f"at offset {x.storage_offset()}")
    flat = torch.as_strided(x, (x.untyped_storage().nbytes() // 4,), (1,))
    return list(x.stride()), flat


def run_driver(exe: Path, records: Sequence[tuple[list[int], list[torch.Tensor]]]
               ) -> list[torch.Tensor]:
    """Feed records (ints, float32 tensors) to a driver; one float32 tensor back per record."""
    payload = bytearray()
    for ints, tensors in records:
        payload += struct.pack(f"<q{len(ints)}q", len(ints), *ints)
        data = torch.cat([t.reshape(-1) for t in tensors]).numpy().tobytes()
        payload += struct.pack("<q", len(data) // 4) + data
    done = subprocess.run([str(exe)], input=bytes(payload), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{exe.name} exited with status {done.returncode}:\n"
                           f"{done.stderr.decode(errors='replace')}")
    out, pos, buf = [], 0, done.stdout
    for _ in records:
        (n,) = struct.unpack_from("<q", buf, pos)
        pos += 8
        out.append(torch.frombuffer(bytearray(buf[pos:pos + 4 * n]), dtype=torch.float32))
        pos += 4 * n
    return out


# --------------------------------------------------------------------------- affinity


@dataclasses.dataclass(frozen=True)
class AffinityCase:
    """One forward + backward of an affinity loss. ``shapes``: intra (B, C, H, W); inter
    ((B, C_a, H_a, W_a), (C_b, H_b, W_b))."""

    name: str
    kind: str  # "intra" or "inter"
    shapes: tuple
    distance: str = "l2"
    mma: bool = False  # intra l2: tf32 tensor-core (WMMA) products (else fp32 FMA)
    noise: float = 0.7  # student = teacher (1 + noise N(0, 1))
    channels_last: bool = False
    zero_vectors: bool = False  # a zero pixel (intra) or channel (inter) in teacher and student
    teacher_grad: bool = True
    seed: int = 0


AFFINITY_CASES = [
    AffinityCase("intra-tiled-l2", "intra", (1, 40, 3, 3)),
    AffinityCase("intra-tiled-l2-two-tiles", "intra", (1, 80, 9, 8), zero_vectors=True),
    AffinityCase("intra-tiled-l2-close", "intra", (1, 48, 4, 4), noise=0.01),
    AffinityCase("intra-tiled-l1", "intra", (2, 6, 7, 11), "l1", zero_vectors=True),
    AffinityCase("intra-tiled-l1-close", "intra", (1, 48, 4, 4), "l1", noise=0.01),
    AffinityCase("intra-tiled-l1-channels-last", "intra", (2, 45, 2, 3), "l1",
                 channels_last=True, teacher_grad=False),
    # tf32 products: from 256 pixels, as the precision rule runs them.
    AffinityCase("intra-tiled-l2-mma", "intra", (1, 256, 16, 16), mma=True),
    AffinityCase("inter-l2", "inter", ((2, 12, 8, 8), (20, 4, 4)), zero_vectors=True),
    AffinityCase("inter-l2-uneven-bins", "inter", ((1, 10, 7, 5), (6, 3, 2))),
    AffinityCase("inter-l2-close", "inter", ((2, 12, 8, 8), (20, 4, 4)), noise=0.01),
    AffinityCase("inter-l2-channels-span-tiles", "inter", ((1, 70, 4, 6), (66, 2, 3)),
                 channels_last=True),
    AffinityCase("inter-l1", "inter", ((2, 8, 6, 6), (16, 6, 6)), "l1", zero_vectors=True),
    AffinityCase("inter-l1-frozen-teacher", "inter", ((1, 10, 7, 5), (6, 3, 2)), "l1",
                 teacher_grad=False),
]


def _pair(shape, noise, seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    s = t * (1 + noise * torch.randn(shape, generator=g, dtype=torch.float64))
    t, s = t.float(), s.float()
    if channels_last:
        t, s = (x.contiguous(memory_format=torch.channels_last) for x in (t, s))
    return t, s


def affinity_inputs(case: AffinityCase) -> list[torch.Tensor]:
    """float32 inputs: intra [teacher, student]; inter [teacher_a, teacher_b, student_a,
    student_b]."""
    if case.kind == "intra":
        t, s = _pair(case.shapes, case.noise, case.seed, case.channels_last)
        if case.zero_vectors:
            t[0, :, 0, 0] = 0
            s[0, :, 0, 0] = 0
            s[-1, :, -1, -1] = 0
        return [t, s]
    (B, Ca, Ha, Wa), (Cb, Hb, Wb) = case.shapes
    t_a, s_a = _pair((B, Ca, Ha, Wa), case.noise, case.seed, case.channels_last)
    t_b, s_b = _pair((B, Cb, Hb, Wb), case.noise, case.seed + 1, case.channels_last)
    if case.zero_vectors:
        t_a[0, 0] = 0
        s_a[0, 0] = 0
        s_b[-1, -1] = 0
    return [t_a, t_b, s_a, s_b]


def _affinity_records(case: AffinityCase, inputs: list[torch.Tensor], grad_loss: float):
    strides, storages = zip(*(_storage(x) for x in inputs), strict=True)
    l1 = int(case.distance == "l1")
    if case.kind == "intra":
        head = [*case.shapes, l1, int(case.mma)]
        ops = (0, 1)
    else:
        (B, Ca, Ha, Wa), (Cb, Hb, Wb) = case.shapes
        head = [B, Ca, Ha, Wa, Cb, Hb, Wb, l1]
        ops = (2, 3)
    flat_strides = [v for st in strides for v in st]
    g = torch.tensor([grad_loss], dtype=torch.float32)
    return [([ops[0], *head, *flat_strides], list(storages)),
            ([ops[1], *head, *flat_strides, int(case.teacher_grad)], [*storages, g])]


def _split_grads(case: AffinityCase, flat: torch.Tensor, inputs: list[torch.Tensor]):
    """Driver gradient output -> {input index: gradient}, in the driver's order (students
    first, then teachers)."""
    order = [1, 0] if case.kind == "intra" else [2, 3, 0, 1]
    if not case.teacher_grad:
        order = order[: len(order) // 2]
    grads, pos = {}, 0
    for i in order:
        n = inputs[i].numel()
        grads[i] = flat[pos:pos + n].reshape(inputs[i].shape)
        pos += n
    assert pos == flat.numel(), (pos, flat.numel())
    return grads


def reference_affinity(case: AffinityCase, inputs: list[torch.Tensor], grad_loss: float):
    """Loss and gradients of snl_kernels.reference in float64 on the same values."""
    from snl_kernels import reference

    x64 = [x.detach().double().requires_grad_(True) for x in inputs]
    if case.kind == "intra":
        loss = reference.intra_affinity_loss(*x64, case.distance)
    else:
        loss = reference.inter_affinity_loss(*x64, case.distance)
    grads = torch.autograd.grad(loss * grad_loss, x64)
    return loss.detach(), dict(enumerate(grads))


@dataclasses.dataclass
class Result:
    case: str
    loss_err: float  # relative
    grad_errs: dict  # input name -> relative (norm-wise) error
    outputs: dict  # name -> float32 tensor, as the driver returned it

    def summary(self) -> str:
        grads = " ".join(f"{n}={e / max(b, 1e-30):.1e}" for n, (e, b) in self.grad_errs.items())
        return f"loss {self.loss_err:.1e}  grads {grads}"

    def failures(self, loss_rtol: float = LOSS_RTOL, grad_rtol: float = GRAD_RTOL) -> list[str]:
        bad = []
        if not self.loss_err <= loss_rtol:  # also catches NaN
            bad.append(f"loss rel err {self.loss_err:.2e} > {loss_rtol:.0e}")
        for name, (err, bound) in self.grad_errs.items():
            if not err <= grad_rtol * bound + GRAD_ATOL:
                bad.append(f"grad {name} err {err:.2e} > {grad_rtol:.0e} * {bound:.2e}")
        return bad


INPUT_NAMES = {"intra": ["teacher", "student"],
               "inter": ["teacher_a", "teacher_b", "student_a", "student_b"]}


def compare_affinity(case: AffinityCase, inputs, loss: torch.Tensor, grads: dict,
                     grad_loss: float) -> Result:
    """Errors of (loss, grads) against the float64 reference."""
    ref_loss, ref_grads = reference_affinity(case, inputs, grad_loss)
    loss_err = abs(loss.double().item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-30)
    names = INPUT_NAMES[case.kind]
    errs, outputs = {}, {"loss": loss}
    for i, g in grads.items():
        r = ref_grads[i]
        errs[names[i]] = ((g.double() - r).norm().item(), r.norm().item())
        outputs[f"grad_{names[i]}"] = g
    return Result(case.name, loss_err, errs, outputs)


def run_affinity(cases: Iterable[AffinityCase], grad_loss: float = 0.75) -> list[Result]:
    cases = list(cases)
    if not cases:
        return []
    exe = build("affinity")
    records, inputs = [], []
    for case in cases:
        xs = affinity_inputs(case)
        inputs.append(xs)
        records += _affinity_records(case, xs, grad_loss)
    outs = run_driver(exe, records)
    results = []
    for k, (case, xs) in enumerate(zip(cases, inputs, strict=True)):
        loss, flat = outs[2 * k], outs[2 * k + 1]
        assert loss.numel() == 1
        results.append(compare_affinity(case, xs, loss[0], _split_grads(case, flat, xs),
                                        grad_loss))
    return results


@dataclasses.dataclass(frozen=True)
class GramOperandsCase:
    """The Gram path's operands [E; D] of images b0 .. b0 + nb (csrc/gram_kernels.cuh)."""

    name: str
    shape: tuple  # (B, C, H, W)
    parts: int  # 0: fp32 values; 1: rounded to tf32; 2: tf32 hi and lo parts
    b0: int = 0
    nb: int | None = None  # default: B - b0
    channels_last: bool = False


GRAM_OPERANDS_CASES = [
    GramOperandsCase("gram-operands-fp32", (2, 20, 5, 7), 0),
    GramOperandsCase("gram-operands-tf32", (2, 20, 5, 7), 1),
    GramOperandsCase("gram-operands-tf32x3", (2, 20, 5, 7), 2),
    GramOperandsCase("gram-operands-chunk-channels-last", (3, 12, 6, 5), 2, b0=1, nb=1,
                     channels_last=True),
]


def _is_tf32(x: torch.Tensor) -> bool:
    return bool((x.view(torch.int32) & 0x1FFF).eq(0).all())


def run_gram_operands(cases: Iterable[GramOperandsCase]) -> list[CosineResult]:
    """Against [E; D] in float64: within fp32 rounding (parts 0), half a tf32 step (1), hi + lo
    within fp32 rounding (2); every part a tf32 value where it should be; zero pixels exactly
    zero."""
    cases = list(cases)
    if not cases:
        return []
    exe = build("affinity")
    records, refs = [], []
    for case in cases:
        B, C, H, W = case.shape
        nb = case.nb if case.nb is not None else B - case.b0
        t, s = _pair(case.shape, 0.7, 0, case.channels_last)
        t[0, :, 0, 0] = 0
        s[0, :, 0, 0] = 0
        s[-1, :, -1, -1] = 0
        strides, storages = zip(*(_storage(x) for x in (t, s)), strict=True)
        records.append(([4, *case.shape, case.parts, case.b0, nb, *strides[0], *strides[1]],
                        list(storages)))
        x = [f.double()[case.b0:case.b0 + nb].reshape(nb, C, H * W) for f in (s, t)]
        x = [v / v.norm(dim=1, keepdim=True).clamp_min(1e-8) for v in x]
        refs.append(torch.cat([x[0] + x[1], x[0] - x[1]], dim=1))
    results = []
    for case, ref, flat in zip(cases, refs, run_driver(exe, records), strict=True):
        parts = flat.reshape(2 if case.parts == 2 else 1, *ref.shape)
        hi = parts[0]
        value = hi.double() + (parts[1].double() if case.parts == 2 else 0)
        step = 2.0 ** -11 * ref.abs() if case.parts == 1 else 0  # half a tf32 step
        err = ((value - ref).abs() / (1e-6 + step)).max().item()
        tf32 = all(_is_tf32(p) for p in parts) if case.parts else True
        zero = ref == 0
        errors = {"values": (err, 1.0), "tf32": (0.0 if tf32 else 1.0, 0.0),
                  "zero pixels": (value[zero].abs().max().item() if zero.any() else 0.0, 0.0)}
        results.append(CosineResult(case.name, errors, {"operands": flat}))
    return results


GRAM_STEP_CASES = [  # (name, nb, C, parts): C past a block of threads, and across rows
    ("gram-steps-fp32", 2, 20, 0),
    ("gram-steps-tf32", 1, 300, 1),
    ("gram-steps-tf32x3", 3, 9, 2),
]


def run_gram_steps(names: Iterable[str]) -> list[CosineResult]:
    """The loss's sum over a Gram and the backward's coefficients (gram_loss_kernel,
    gram_coefficients_kernel) against float64: the sum within 1e-6 relative (float64 sums,
    a float32 result), K within fp32 rounding (parts 0), half a tf32 step (1) or with hi + lo
    within fp32 rounding (2), each part a tf32 value where it should be."""
    cases = [c for c in GRAM_STEP_CASES if c[0] in set(names)]
    if not cases:
        return []
    exe = build("affinity")
    g_gen = torch.Generator().manual_seed(3)
    records, inputs = [], []
    for _name, nb, c, parts in cases:
        a = torch.randn(nb, 2 * c, 40, generator=g_gen, dtype=torch.float64)
        gram = (a @ a.transpose(1, 2)).float()  # symmetric up to its own rounding
        grad_loss, m = torch.tensor([0.75]), 4 * 64 * 64
        inputs.append((gram, grad_loss, m))
        records.append(([6, nb, c], [gram]))
        for side in (0, 1):
            records.append(([7, nb, c, side, parts, m], [gram, grad_loss]))
    outs = run_driver(exe, records)
    results = []
    for k, ((name, _nb, c, parts), (gram, _grad, m)) in enumerate(zip(cases, inputs,
                                                                       strict=True)):
        g = gram.double()
        ee, ed, de, dd = g[:, :c, :c], g[:, :c, c:], g[:, c:, :c], g[:, c:, c:]
        want = (ee * dd).sum() + (ed * de).sum()
        loss = outs[3 * k]
        errors = {"loss sum": (abs(loss.item() - want.item()) / abs(want.item()), 1e-6)}
        for side, sign in ((0, 1.0), (1, -1.0)):
            ref = torch.cat([dd + sign * ed, de + sign * ee], dim=2) * (0.75 / m)
            flat = outs[3 * k + 1 + side].reshape(2 if parts == 2 else 1, *ref.shape)
            value = flat[0].double() + (flat[1].double() if parts == 2 else 0)
            scale = ref.abs().max().item()
            step = 2.0 ** -11 * ref.abs() if parts == 1 else 0
            err = ((value - ref).abs() / (1e-6 * scale + step)).max().item()
            tf32 = all(_is_tf32(p) for p in flat) if parts else True
            errors[f"K side {side}"] = (err, 1.0)
            errors[f"K side {side} tf32"] = (0.0 if tf32 else 1.0, 0.0)
        results.append(CosineResult(name, errors, {"loss": loss}))
    return results


# --------------------------------------------------------------------------- cosine distances

COS_ATOL, COS_RTOL = 2e-5, 1e-5  # forward, elementwise (tests/support.py's oracle bar)
COS_GRAD_RTOL = 1e-4  # gradients, norm-wise


@dataclasses.dataclass(frozen=True)
class CosineCase:
    """Pixel, channel and sample cosine distances of (B, C, H, W) features and their
    gradients for random upstream gradients."""

    name: str
    shape: tuple
    channels_last: bool = False
    zero_vectors: bool = False  # a zero pixel and a zero channel (clamped norms)
    teacher_grad: bool = True
    seed: int = 0


COSINE_CASES = [
    CosineCase("cosine", (2, 20, 5, 7)),
    CosineCase("cosine-channels-last", (2, 40, 3, 6), channels_last=True, teacher_grad=False),
    CosineCase("cosine-zero-vectors", (2, 9, 4, 4), zero_vectors=True),
    # Forward tiles (csrc/cosine_distances_kernels.cuh, fwd_tile_pixels): the cases above
    # take 16-pixel tiles (2 channels per warp step); then 32, 64 and 128.
    CosineCase("cosine-32-pixel-tiles", (1, 6, 72, 64)),
    CosineCase("cosine-64-pixel-tiles", (1, 5, 128, 128)),
    CosineCase("cosine-128-pixel-tiles", (1, 3, 128, 256)),
    CosineCase("cosine-odd-channels-16-pixel-tiles", (3, 33, 5, 9)),
]


@dataclasses.dataclass
class CosineResult:  # also CRAM's
    case: str
    errors: dict  # name -> (error, allowed)
    outputs: dict

    def summary(self) -> str:
        return "  ".join(f"{n} {e / max(a, 1e-30):.1e}" for n, (e, a) in self.errors.items()) + (
            "  (error / allowed)")

    def failures(self) -> list[str]:
        return [f"{n} err {e:.2e} > {a:.2e}" for n, (e, a) in self.errors.items() if not e <= a]


def cosine_inputs(case: CosineCase):
    t, s = _pair(case.shape, 0.7, case.seed, case.channels_last)
    if case.zero_vectors:
        t[0, :, 0, 0] = 0
        s[-1, 1] = 0
    B, C, H, W = case.shape
    g = torch.Generator().manual_seed(case.seed + 7)
    grads = [torch.randn(shape, generator=g) for shape in ((B, H, W), (B, C), (B,))]
    return [t, s], grads


def run_cosine(cases: Iterable[CosineCase]) -> list[CosineResult]:
    from snl_kernels import reference

    cases = list(cases)
    if not cases:
        return []
    exe = build("cosine_distances")
    records, inputs = [], []
    for case in cases:
        xs, grads = cosine_inputs(case)
        inputs.append((xs, grads))
        strides, storages = zip(*(_storage(x) for x in xs), strict=True)
        records.append(([*case.shape, *strides[0], *strides[1], int(case.teacher_grad)],
                        [*storages, *grads]))
    results = []
    for case, (xs, grads), flat in zip(cases, inputs, run_driver(exe, records), strict=True):
        B, C, H, W = case.shape
        x64 = [x.double().requires_grad_(True) for x in xs]
        ref = reference.cosine_distances(*x64)
        ref_grads = torch.autograd.grad(
            sum((r * g.double()).sum() for r, g in zip(ref, grads, strict=True)), x64)
        sizes = {"pixel": B * H * W, "channel": B * C, "sample": B, "grad_student": xs[1].numel(),
                 "grad_teacher": xs[0].numel() if case.teacher_grad else 0}
        outputs = dict(zip(sizes, flat.split(list(sizes.values())), strict=True))
        errors = {}
        for name, r in zip(("pixel", "channel", "sample"), ref, strict=True):
            err = (outputs[name].double() - r.detach().reshape(-1)).abs()
            allowed = COS_ATOL + COS_RTOL * r.detach().reshape(-1).abs()
            errors[name] = ((err / allowed).max().item(), 1.0)  # worst share of the allowance
        for name, r in (("grad_student", ref_grads[1]), ("grad_teacher", ref_grads[0])):
            if outputs[name].numel():
                diff = outputs[name].double() - r.contiguous().reshape(-1)
                errors[name] = (diff.norm().item(), COS_GRAD_RTOL * r.norm().item() + 1e-6)
        results.append(CosineResult(case.name, errors, outputs))
    return results


# --------------------------------------------------------------------------- anomaly map

# The per-level distance kernel. Pixels per block:
# 16 below 132 blocks of 32 pixels (csrc/anomaly_map_kernels.cuh, distance_pixels), with 32
# warps below 1024 blocks, else 8.
ANOMALY_MAP_CASES = [
    CosineCase("map-16-pixel-blocks", (2, 37, 5, 7)),
    CosineCase("map-16-pixel-blocks-channels-last", (3, 20, 4, 9), channels_last=True),
    CosineCase("map-32-pixel-blocks-32-warps", (2, 9, 40, 60)),
    CosineCase("map-32-pixel-blocks-8-warps", (1, 5, 160, 208)),
    CosineCase("map-zero-vectors", (2, 9, 4, 4), zero_vectors=True),
]


def run_anomaly_map(cases: Iterable[CosineCase]) -> list[CosineResult]:
    from snl_kernels import reference

    cases = list(cases)
    if not cases:
        return []
    exe = build("anomaly_map")
    records, inputs = [], []
    for case in cases:
        xs, _ = cosine_inputs(case)
        inputs.append(xs)
        strides, storages = zip(*(_storage(x) for x in xs), strict=True)
        records.append(([*case.shape, *strides[0], *strides[1]], list(storages)))
    results = []
    for case, xs, flat in zip(cases, inputs, run_driver(exe, records), strict=True):
        B, _, H, W = case.shape
        m = flat.reshape(B, H, W + 1)
        r = reference.cosine_distances(*(x.double() for x in xs)).pixel
        err = (m[..., :W].double() - r).abs()
        allowed = COS_ATOL + COS_RTOL * r.abs()
        errors = {"distance": ((err / allowed).max().item(), 1.0),
                  "padding": (m[..., W].abs().max().item(), 0.0)}
        results.append(CosineResult(case.name, errors, {"m": m.reshape(-1)}))
    return results


@dataclasses.dataclass(frozen=True)
class CombineCase:
    """The combine and score kernels: maps[b] = sum_k mh[k] @ m[b, k] @ mw[k]^T of L levels
    zero-padded to (hk, wk), to height x width, and each map's max."""

    name: str
    B: int
    levels: tuple  # (h, w) of each level
    size: tuple  # (height, width)
    seed: int = 0
    pad_w: int = 1  # zero columns past the widest level (the CUDA op pads none)


# Tiles of 16 x 128 outputs: a partial tile in each direction, and several.
COMBINE_CASES = [
    CombineCase("combine-one-level", 2, ((5, 7),), (20, 30)),
    CombineCase("combine-three-levels", 3, ((8, 8), (4, 4), (2, 2)), (33, 140)),
    CombineCase("combine-uneven-levels", 1, ((6, 9), (3, 5)), (17, 257)),
]


def combine_inputs(case: CombineCase) -> list[torch.Tensor]:
    """m (B, L, hk, wk) nonnegative and zero-padded, operators mh (L, height, hk) and mw
    (L, width, wk) zero-padded like snl_kernels.anomaly_map.operators."""
    g = torch.Generator().manual_seed(case.seed)
    hk = max(h for h, _ in case.levels)
    wk = max(w for _, w in case.levels) + case.pad_w
    L, (height, width) = len(case.levels), case.size
    m = torch.zeros(case.B, L, hk, wk)
    mh, mw = torch.zeros(L, height, hk), torch.zeros(L, width, wk)
    for k, (h, w) in enumerate(case.levels):
        m[:, k, :h, :w] = torch.rand((case.B, h, w), generator=g)
        mh[k, :, :h] = torch.rand((height, h), generator=g) / h
        mw[k, :, :w] = torch.rand((width, w), generator=g) / w
    return [m, mh, mw]


def run_anomaly_map_combine(cases: Iterable[CombineCase]) -> list[CosineResult]:
    cases = list(cases)
    if not cases:
        return []
    exe = build("anomaly_map_combine")
    records, inputs = [], []
    for case in cases:
        xs = combine_inputs(case)
        inputs.append(xs)
        records.append(([case.B, *xs[0].shape[1:], *case.size], xs))
    results = []
    for case, (m, mh, mw), flat in zip(cases, inputs, run_driver(exe, records), strict=True):
        height, width = case.size
        maps, scores = flat.split([case.B * height * width, case.B])
        ref = torch.einsum("khi,bkij,kwj->bhw", mh.double(), m.double(), mw.double())
        err = (maps.reshape(ref.shape).double() - ref).abs()
        allowed = COS_ATOL + COS_RTOL * ref.abs()
        errors = {"maps": ((err / allowed).max().item(), 1.0),
                  "scores": ((scores.double() - ref.amax((1, 2))).abs().max().item(),
                             COS_ATOL + COS_RTOL * ref.abs().max().item())}
        results.append(CosineResult(case.name, errors, {"maps": maps, "scores": scores}))
    return results


# --------------------------------------------------------------------------- CRAM

CRAM_ATOL = 1e-5  # forward, elementwise, over max(|reference|, 1) (tests/test_cram.py's bar)
CRAM_GRAD_RTOL = 1e-4  # gradients, norm-wise over max(|reference|, 1)


@dataclasses.dataclass(frozen=True)
class CramCase:
    """CRAM of a (B, D, H, W) embedding with K centres at temperature exp(log_tau)."""

    name: str
    shape: tuple
    K: int
    log_tau: float
    channels_last: bool = False
    seed: int = 0


CRAM_CASES = [
    CramCase("cram-odd-sizes", (2, 40, 3, 5), 7, 1.0),
    CramCase("cram-k-not-power-of-two", (1, 64, 4, 4), 33, 3.0),
    CramCase("cram-many-channels", (1, 129, 3, 3), 40, 1.0),
    CramCase("cram-256-centres", (1, 16, 2, 3), 256, 2.0),
    CramCase("cram-channels-last", (2, 24, 3, 11), 5, 1.5, channels_last=True),
]


def run_cram(cases: Iterable[CramCase]) -> list[CosineResult]:
    from snl_kernels import reference

    cases = list(cases)
    if not cases:
        return []
    exe = build("cram")
    records, inputs = [], []
    for case in cases:
        g = torch.Generator().manual_seed(case.seed)
        B, D, H, W = case.shape
        e = torch.randn(case.shape, generator=g)
        if case.channels_last:
            e = e.contiguous(memory_format=torch.channels_last)
        c = torch.randn(case.K, D, generator=g)
        t = torch.tensor([case.log_tau])
        ups = [torch.randn(shape, generator=g)
               for shape in ((B, D, H, W), (B, case.K, H, W), (B, H, W))]
        inputs.append((e, c, t, ups))
        strides, storage = _storage(e)
        records.append(([*case.shape, case.K, *strides], [storage, c, t, *ups]))
    results = []
    for case, (e, c, t, ups), flat in zip(cases, inputs, run_driver(exe, records), strict=True):
        x64 = [x.double().requires_grad_(True) for x in (e, c, t.reshape(()))]
        ref = reference.cram(*x64)
        ref_grads = torch.autograd.grad(
            sum((r * u.double()).sum() for r, u in zip(ref, ups, strict=True)), x64)
        names = ["central", "assign", "compact", "grad_embedding", "grad_centers", "grad_log_tau"]
        sizes = [r.numel() for r in ref] + [x.numel() for x in x64]
        outputs = dict(zip(names, flat.split(sizes), strict=True))
        errors = {}
        for name, r in zip(names, [*ref, *ref_grads], strict=True):
            r = r.detach().contiguous().reshape(-1)
            scale = max(r.abs().max().item(), 1.0)
            diff = outputs[name].double() - r
            if name.startswith("grad"):
                errors[name] = (diff.norm().item(), CRAM_GRAD_RTOL * max(r.norm().item(), 1.0))
            else:
                errors[name] = (diff.abs().max().item() / scale, CRAM_ATOL)
        results.append(CosineResult(case.name, errors, outputs))
    return results


# --------------------------------------------------------------------------- command line


def _compare_bits(results: list, saved: dict) -> int:
    """Print which outputs differ in any bit from a saved run; the number of cases that do."""
    differ = 0
    for r in results:
        if r.case not in saved:
            print(f"     {r.case:34s} not in the saved run")
            continue
        changed = [name for name, x in r.outputs.items()
                   if name not in saved[r.case] or not torch.equal(x, saved[r.case][name])]
        differ += bool(changed)
        print(f"{'DIFF' if changed else 'same'} {r.case:34s} bits"
              + (f" differ: {', '.join(changed)}" if changed else ""))
    return differ


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cuda_emulation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("--save", type=Path, help="torch.save the outputs here")
    parser.add_argument("--compare", type=Path,
                        help="outputs saved by --save: report the cases whose bits differ")
    args = parser.parse_args(argv)
    if compiler() is None:
        print("no C++ compiler (g++ or $CXX): cannot build the emulation", file=sys.stderr)
        return 2
    results = [*run_affinity(c for c in AFFINITY_CASES if args.k in c.name),
               *run_gram_operands(c for c in GRAM_OPERANDS_CASES if args.k in c.name),
               *run_gram_steps(c[0] for c in GRAM_STEP_CASES if args.k in c[0]),
               *run_cosine(c for c in COSINE_CASES if args.k in c.name),
               *run_anomaly_map(c for c in ANOMALY_MAP_CASES if args.k in c.name),
               *run_anomaly_map_combine(c for c in COMBINE_CASES if args.k in c.name),
               *run_cram(c for c in CRAM_CASES if args.k in c.name)]
    failed = 0
    for r in results:
        bad = r.failures()
        failed += bool(bad)
        print(f"{'FAIL' if bad else 'ok  '} {r.case:34s} {r.summary()}"
              + (f"  <- {'; '.join(bad)}" if bad else ""))
    if args.save:
        torch.save({r.case: r.outputs for r in results}, args.save)
    if args.compare:
        failed += _compare_bits(results, torch.load(args.compare))
    print(f"{len(results) - failed} of {len(results)} cases within the bar against float64 "
          f"(affinity: loss {LOSS_RTOL:.0e}, gradients {GRAD_RTOL:.0e}; cosine distances: "
          f"{COS_ATOL:.0e} + {COS_RTOL:.0e} |x|, gradients {COS_GRAD_RTOL:.0e}; CRAM: "
          f"{CRAM_ATOL:.0e}, gradients {CRAM_GRAD_RTOL:.0e})")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
