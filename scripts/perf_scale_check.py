"""Check the performance model's scaling: count an op at the benchmark batch itself and as
the full mode does (one sample with B = 16's launch plans, times 16), and compare.

    TRITON_INTERPRET=1 SNL_TRITON_CONFIG=gpu python scripts/perf_scale_check.py [OP ...]

Prints, per op and in all, the requested and distinct bytes and FLOPs both ways and their
ratio; exits 1 if any total differs by more than 1%. Slow: the benchmark batch under the
interpreter takes about 16 times the full mode's count of the op and a few GB of memory.
"""

from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("SNL_TRITON_CONFIG") != "gpu":
    sys.exit("run with TRITON_INTERPRET=1 SNL_TRITON_CONFIG=gpu")

from snl_kernels.perf import counting, workloads

# Fold each launch's addresses into unique ones once, at its end: the counts are the same,
# and at B = 16 the repeated folds of the counting's default cost time quadratic in the
# addresses (hours for the cosine distances; the full mode's B = 1 does not need this).
counting._COMPACT_AT = 1 << 40

KEYS = ("read_requested", "write_requested", "read_distinct", "write_distinct", "dot_flops",
        "fma_flops")


def totals(op: str, shapes: workloads.Shapes) -> tuple[dict, int]:
    launches = []

    def each(phase, run):
        launches.extend(counting.count(run))

    workloads.phases(op, shapes, each)
    factor = workloads.scale(op, shapes)
    scaled = [launch.scaled(factor) for launch in launches]
    return {key: sum(getattr(x, key) for x in scaled) for key in KEYS}, len(launches)


def main(argv: list[str]) -> int:
    ops = argv or ["anomaly_map"]
    worst = 0.0
    for op in ops:
        start = time.perf_counter()
        full, n_full = totals(op, workloads.BENCHMARK)
        scaled, n_scaled = totals(op, workloads.COUNT_FULL)
        print(f"{op}: {n_full} launches at B = 16, {n_scaled} counted at B = 1 "
              f"({time.perf_counter() - start:.0f} s)")
        for key in KEYS:
            ratio = scaled[key] / full[key] if full[key] else (1.0 if not scaled[key] else 0.0)
            worst = max(worst, abs(ratio - 1.0))
            print(f"  {key:16s} B = 16: {full[key]:.4g}  B = 1 x 16: {scaled[key]:.4g}  "
                  f"ratio {ratio:.4f}")
    print(f"largest difference: {100 * worst:.2f}%")
    return 1 if worst > 0.01 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
