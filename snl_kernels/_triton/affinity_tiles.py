"""What the affinity kernels share: block sizes, the tile loaders, the inverse norms' loads,
the products at their precisions (``_dot``), and the configuration's tile choices.

See ``affinity.py`` for the kernels' layout and math.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import gpu_config, next_power_of_2

BLOCK_ROWS = 32
BLOCK_K = 32
BLOCK_GRAM = 32  # Gram tiles: BLOCK_GRAM rows (BLOCK_GRAM_GPU on a GPU)
BLOCK_GRAM_GPU = 64  # 64 rows and up: tiles Hopper's wgmma takes
BLOCK_ELEMENTS = 512  # elements per program of pooling and its gradient


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, next_power_of_2(n))
    return min(p, hi) if hi else p


# --------------------------------------------------------------------------- loaders


@triton.jit
def _tile(ptr, rows, ks, R, K, W, s_c, s_h, s_w, PIX_ROWS: tl.constexpr):
    """fp32 (len(rows), len(ks)) tile; rows are pixels and ks channels, or the reverse."""
    if PIX_ROWS:
        off = ((rows // W) * s_h + (rows % W) * s_w)[:, None] + (ks * s_c)[None, :]
    else:
        off = (rows * s_c)[:, None] + ((ks // W) * s_h + (ks % W) * s_w)[None, :]
    mask = (rows < R)[:, None] & (ks < K)[None, :]
    return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _vec(ptr, idx, n):
    return tl.load(ptr + idx, mask=idx < n, other=0.0)


@triton.jit
def _inv_norm_of(x, EPS: tl.constexpr, AXIS: tl.constexpr):
    """1 / max(|v|, eps) of the vectors v along AXIS of a tile held whole, negative for a
    zero vector (as ``_inv_norm_kernel`` writes them)."""
    r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=AXIS)), EPS)
    return tl.where(tl.max(tl.abs(x), axis=AXIS) == 0.0, -r, r)


@triton.jit
def _norms(rs_ptr, rt_ptr, b, idx, n):
    """Student's and teacher's inverse norms of rows idx of sample b (n rows each; 0 past n)."""
    return _vec(rs_ptr + b * n, idx, n), _vec(rt_ptr + b * n, idx, n)


@triton.jit
def _zero_pairs(r_as, r_at, r_bs, r_bt):
    """Where Delta[i, j] is exactly 0 because of zero vectors (negative inverse norms).

    A_T[i, j] is 0 when row i or column j of the teacher is a zero vector, A_S[i, j] likewise;
    when both are, Delta is exactly 0 (the reference's sign(0) = 0). The difference form sums
    +-x_i . y_j pairs that cancel only up to the order of the hardware's sums, and a stray
    sign there moves an l1 gradient by the 1 / eps of a clamped norm.
    """
    teacher = (r_at < 0.0)[:, None] | (r_bt < 0.0)[None, :]
    student = (r_as < 0.0)[:, None] | (r_bs < 0.0)[None, :]
    return teacher & student


@triton.jit
def _out_tile(BM: tl.constexpr, BN: tl.constexpr):
    """Sample b (grid axis 2) and the rows (axis 0) and columns (axis 1) of this program's
    (BM, BN) output tile."""
    b = tl.program_id(2).to(tl.int64)
    return b, tl.program_id(0) * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)


@triton.jit
def _tf32(x):
    """x rounded to the nearest tf32 value (ties away from zero, as cvt.rna.tf32.f32)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b from fp32 tiles at PRECISION (``snl_kernels/precision.py``).

    "tf32": one tensor-core product of the operands rounded to nearest. Tensor cores read
    only the top 19 bits of an fp32 register, i.e. truncate, a biased error that rounding to
    nearest removes (both measured: BENCHMARKS.md, Accuracy). "tf32x3":
    each operand split into a rounded high part and a rounded remainder, three products
    (the low x low one is dropped), about fp32 accuracy. Both are written out here rather
    than left to ``input_precision`` so that the CPU interpreter (whose products are fp32
    whatever the precision) computes exactly what the tensor cores do.
    """
    if PRECISION == "ieee":
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "tf32":
        out = tl.dot(_tf32(a), _tf32(b), acc, input_precision="tf32")
    elif PRECISION == "tf32x3-exact-a":
        # tf32x3 where a holds tf32 values exactly (l1's +-1 and 0): its remainder is 0, so the
        # product it would enter is dropped; the same bits as "tf32x3", two products of three.
        b_hi = _tf32(b)
        out = tl.dot(a, _tf32(b - b_hi), acc, input_precision="tf32")
        out = tl.dot(a, b_hi, out, input_precision="tf32")
    else:
        a_hi = _tf32(a)
        b_hi = _tf32(b)
        out = tl.dot(_tf32(a - a_hi), b_hi, acc, input_precision="tf32")
        out = tl.dot(a_hi, _tf32(b - b_hi), out, input_precision="tf32")
        out = tl.dot(a_hi, b_hi, out, input_precision="tf32")
    return out


@triton.jit
def _ready(x, PRECISION: tl.constexpr):
    """x as a product's operand that a later kernel reads straight from memory: rounded to
    the nearest tf32 value at "tf32" (what ``_dot`` would do to it), as it is otherwise."""
    if PRECISION == "tf32":
        x = _tf32(x)
    return x


@triton.jit
def _dot_ready(a, b, acc, PRECISION: tl.constexpr):
    """``_dot(a, b, acc, PRECISION)`` where b was stored through ``_ready``: at "tf32" it
    enters the product as loaded, so Hopper's wgmma reads it from shared memory while the
    next step's loads are in flight (a b rounded in registers would make every step wait
    for its product); a, formed in registers, is rounded here."""
    if PRECISION == "tf32":
        out = tl.dot(_tf32(a), b, acc, input_precision="tf32")
    else:
        out = _dot(a, b, acc, PRECISION)
    return out


@triton.jit
def _delta_finish(delta, r_as, r_at, r_bs, r_bt, ri, rj, pid_i, pid_j, b, n_i, n_j, Ra, Rb,
                  WORDS, out_ptr, g_ptr, coef, sign_ptr, L1: tl.constexpr,
                  WRITE_GRAD: tl.constexpr, SYMMETRIC: tl.constexpr,
                  WRITE_SIGNS: tl.constexpr, BITS: tl.constexpr, BI: tl.constexpr,
                  BJ: tl.constexpr, PRECISION: tl.constexpr):
    """What a Delta tile writes: its sign bits, dL/dDelta or its partial sum. WRITE_SIGNS:
    0 nothing more, ``SIGN_BITS`` (1, or True) the sign bits of Delta, ``UNIT_GRAD`` (2)
    beside the partial sum dL/dDelta for a unit upstream gradient (coef Delta; for l1
    sign(Delta) itself, exact at any precision, the products taking coef; not for
    SYMMETRIC), ``DELTA`` (3) beside the partial sum Delta itself,
    fp32 (B, Ra, Rb) (for SYMMETRIC, the tiles computed and their mirrors), all into
    ``sign_ptr``."""
    if L1:
        delta = tl.where(_zero_pairs(r_as, r_at, r_bs, r_bt), 0.0, delta)
    if WRITE_SIGNS == 1:
        # Bit j % 32 of word (i, j // 32) says Delta[i, j] > 0, for the tiles computed (the
        # upper triangle of tiles); BITS = min(BJ, 32) columns per word of this tile.
        bits = (delta > 0).to(tl.int32) << (rj % 32)[None, :]
        words = tl.sum(tl.reshape(bits, [BI, BJ // BITS, BITS]), axis=2)
        cols = (pid_j * BJ) // 32 + tl.arange(0, BJ // BITS)
        keep = (ri < Ra)[:, None] & ((cols < WORDS) & (cols * 0 + pid_j >= pid_i))[None, :]
        tl.store(sign_ptr + (b * Ra + ri[:, None]) * WORDS + cols[None, :], words, mask=keep)
    if WRITE_GRAD:
        # dL/dDelta = g coef Delta (l2, coef = 2 / M) or g coef sign(Delta) (l1, coef = 1 / M).
        scale = tl.load(g_ptr) * coef
        if L1:
            grad = tl.where(delta > 0, scale, tl.where(delta < 0, -scale, 0.0))
        else:
            grad = delta * scale
        # Stored as the operand the products with it (``scaled_mm``) read as it is.
        mask = (ri < Ra)[:, None] & (rj < Rb)[None, :]
        tl.store(out_ptr + (b * Ra + ri[:, None]) * Rb + rj[None, :], _ready(grad, PRECISION),
                 mask=mask)
    else:
        if L1:
            part = tl.sum(tl.sum(tl.abs(delta), axis=1), axis=0)
        else:
            part = tl.sum(tl.sum(delta * delta, axis=1), axis=0)
        if SYMMETRIC:
            part = tl.where(pid_j > pid_i, 2.0 * part, part)
        tl.store(out_ptr + (b * n_i + pid_i) * n_j + pid_j, part)
        if WRITE_SIGNS == 2:
            # The backward scales the products with it by the upstream gradient (through
            # their operands' norms), so that it stays rounded as those products read it.
            if L1:
                unit = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
            else:
                unit = delta * coef
            mask = (ri < Ra)[:, None] & (rj < Rb)[None, :]
            tl.store(sign_ptr + (b * Ra + ri[:, None]) * Rb + rj[None, :],
                     _ready(unit, PRECISION), mask=mask)
        if WRITE_SIGNS == 3:
            # Delta as formed, for a backward that reads it instead of forming it again.
            mask = (ri < Ra)[:, None] & (rj < Rb)[None, :]
            if SYMMETRIC:
                # (pid_j as a vector: a scalar in a mask fails in some interpreters)
                mask = mask & ((rj * 0 + pid_j) >= pid_i)[None, :]
                tl.store(sign_ptr + (b * Rb + rj[None, :]) * Ra + ri[:, None], delta,
                         mask=mask)
            tl.store(sign_ptr + (b * Ra + ri[:, None]) * Rb + rj[None, :], delta, mask=mask)


@triton.jit
def _sign_tile(sign_ptr, ri, rj, b, N, WORDS, r_si, r_ti, r_sj, r_tj, BI: tl.constexpr):
    """l1's dL/dDelta up to its scale, +-1 or 0, for pixels ri x rj of sample b, from the
    forward's sign bits: Delta is symmetric and only tiles (I, J) with I <= J (in units of
    BI = the forward's tile) were stored; exactly 0 where both affinities are (zero
    pixels) and outside the N x N matrix."""
    up = (ri // BI)[:, None] <= (rj // BI)[None, :]
    row = tl.where(up, ri[:, None], rj[None, :])
    col = tl.where(up, rj[None, :], ri[:, None])
    inside = (ri < N)[:, None] & (rj < N)[None, :]
    word = tl.load(sign_ptr + (b * N + row) * WORDS + col // 32, mask=inside, other=0)
    gd = tl.where(((word >> (col % 32)) & 1) != 0, 1.0, -1.0)
    return tl.where(inside & ~_zero_pairs(r_si, r_ti, r_sj, r_tj), gd, 0.0)


INTERPRETED = not isinstance(_dot, triton.runtime.JITFunction)
# Tile choices of the two configurations (``gpu_config``): the interpreter's (small, few
# numpy programs on test shapes) and the GPU's (``*_GPU``).
# Delta tiles, BLOCK_TILE x BLOCK_TILE: larger tiles re-read the operands fewer times on a
# GPU; small ones keep the CPU interpreter (numpy per program) quick on test shapes.
BLOCK_TILE, BLOCK_TILE_GPU = 32, 64
# Channels per program of the tiled backward: each block of channels recomputes the Delta
# tiles, so on a GPU as many as the registers allow; under the interpreter few, so that the
# tests' shapes split the channels too.
MAX_BLOCK_C, MAX_BLOCK_C_GPU = 32, 256
# l1's backward from sign bits recomputes nothing per channel block, and Triton's pipelining
# stages its 64-pixel x BC operand tiles in shared memory: at BC = 256 that needs 310-440 KB,
# over the 227 KB a block may have on an H200 (scripts/triton_compile_check.py reports it).
MAX_BLOCK_C_SIGNS, MAX_BLOCK_C_SIGNS_GPU = 32, 64


def _tiles() -> tuple[int, int, int]:
    """(Delta tile, channels per tiled-backward program, the same for l1 from sign bits) of
    the configuration in force (see ``gpu_config``)."""
    if gpu_config(INTERPRETED):
        return BLOCK_TILE_GPU, MAX_BLOCK_C_GPU, MAX_BLOCK_C_SIGNS_GPU
    return BLOCK_TILE, MAX_BLOCK_C, MAX_BLOCK_C_SIGNS


def _slot_name(name: str, j: int) -> str:
    return f"{name[:-4]}{j}" if name.endswith("_ptr") else f"{name}{j}"


def _slot_names(names: tuple[str, ...], slots: int) -> list[tuple[tuple[str, str], ...]]:
    """Per slot of a grouped kernel, (its parameter name, the single kernel's name) pairs."""
    return [tuple((_slot_name(n, j), n) for n in names) for j in range(slots)]
