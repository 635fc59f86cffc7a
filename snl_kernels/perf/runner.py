"""The model's two passes, each in a process of its own (Triton decides at import whether
its kernels are interpreted):

- ``count``: under the interpreter with the GPU configuration, every launch's bytes and
  FLOPs (:mod:`.counting`), scaled from the counted shapes to the benchmark's batch;
- ``compile``: without the interpreter, every launch compiled for sm_90, its resources,
  instructions and host time (:mod:`.compiled`), at the shapes the counts stand for.

``python -m snl_kernels.perf.runner count|compile --mode full|quick --out FILE [--ops ...]``
writes ``{op: {...}}`` as JSON; :mod:`snl_kernels.perf.__main__` runs both and joins them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

from . import workloads

#: Per mode: the shapes counted under the interpreter and the shapes compiled (the ones the
#: counts stand for after scaling).
MODES = {
    "full": (workloads.COUNT_FULL, workloads.BENCHMARK),
    "quick": (workloads.QUICK, replace(workloads.QUICK, batch=16, plan_batch=None)),
}


def count(ops, mode: str, progress=None) -> dict:
    from . import counting

    shapes = MODES[mode][0]
    out = {}
    for op in ops:
        start = time.perf_counter()
        launches = []

        def each(phase, run, launches=launches):
            launches.extend((phase, launch) for launch in counting.count(run))

        ideal = workloads.phases(op, shapes, each)
        factor = workloads.scale(op, shapes)
        out[op] = {
            "ideal_bytes": round(ideal * factor),
            "scale": factor,
            "count_seconds": round(time.perf_counter() - start, 1),
            "launches": [dict(asdict(launch.scaled(factor)), phase=phase)
                         for phase, launch in launches],
        }
        if progress:
            progress(f"count {op}: {len(launches)} launches, "
                     f"{out[op]['count_seconds']} s")
    return out


def compile_(ops, mode: str, host_time: bool = True, progress=None) -> dict:
    from . import compiled

    shapes = MODES[mode][1]
    recorder = compiled.recorder()
    recorder.host_time = host_time
    out = {}
    for op in ops:
        start = time.perf_counter()
        recorder.launches = []
        phases = []

        def each(phase, run, phases=phases):
            first = len(recorder.launches)
            recorder.active = True
            try:
                run()
            finally:
                recorder.active = False
            phases.extend([phase] * (len(recorder.launches) - first))

        workloads.phases(op, shapes, each)
        out[op] = {
            "compile_seconds": round(time.perf_counter() - start, 1),
            "launches": [dict(asdict(launch), phase=phase,
                              kernel_info=asdict(recorder.kernels[launch.key]),
                              blocks_per_sm=recorder.kernels[launch.key].blocks_per_sm)
                         for launch, phase in zip(recorder.launches, phases, strict=True)],
        }
        if progress:
            progress(f"compile {op}: {len(recorder.launches)} launches, "
                     f"{out[op]['compile_seconds']} s")
    return out


def start_pass(kind: str, ops, mode: str, out_path: str, host_time: bool = True,
               log=None) -> subprocess.Popen:
    """Start one pass in a fresh process with the right environment."""
    env = dict(os.environ, SNL_TRITON_CONFIG="gpu")
    if kind == "count":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "snl_kernels.perf.runner", kind, "--mode", mode,
           "--out", out_path, "--ops", *ops]
    if not host_time:
        cmd.append("--no-host-time")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)


def run_passes(ops, mode: str, work_dir: str, host_time: bool = True, log=None):
    """Both passes at once (one core each): returns (counted, compiled) JSON."""
    paths = {kind: os.path.join(work_dir, f"{kind}.json") for kind in ("count", "compile")}
    procs = {kind: start_pass(kind, ops, mode, path, host_time, log)
             for kind, path in paths.items()}
    failed = [kind for kind, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"the model's {' and '.join(failed)} pass failed (its output is "
                           "above)")
    out = []
    for kind in ("count", "compile"):
        with open(paths[kind]) as f:
            out.append(json.load(f))
    return tuple(out)


#: Files whose changes need no new counts: the predictions are recomputed from stored ones.
#: Files the Triton passes' counts do not depend on: the predictions, the command, and the
#: CUDA backend's passes (their own digest: cuda.sources_digest).
DERIVED = ("model.py", "__main__.py", "cuda.py", "cuda_sass.py")


def sources_digest(root: str | None = None) -> str:
    """A digest of what the two passes' counts depend on: the Triton kernels, the op modules
    and the passes' own code (the predictions made from the counts, ``model.py``, are
    recomputed from stored counts with ``--from``)."""
    import hashlib
    from pathlib import Path

    base = Path(root) if root else Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for folder in ("snl_kernels", "snl_kernels/_triton", "snl_kernels/perf"):
        for path in sorted((base / folder).glob("*.[pc]*")):
            if path.name in DERIVED or path.suffix not in (".py", ".c"):
                continue
            digest.update(path.relative_to(base).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("count", "compile"))
    parser.add_argument("--mode", choices=tuple(MODES), default="full")
    parser.add_argument("--ops", nargs="+", default=list(workloads.OPS),
                        choices=workloads.OPS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-host-time", action="store_true")
    args = parser.parse_args(argv)

    def progress(line):
        print(line, flush=True)

    if args.kind == "count":
        result = count(args.ops, args.mode, progress)
    else:
        result = compile_(args.ops, args.mode, not args.no_host_time, progress)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
