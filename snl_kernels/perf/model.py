"""Predicted time of every launch and op, from the counts and the compiled kernels.

Per launch, on the device: the larger of its distinct bytes over the copy bandwidth and its
FLOPs over the rate of the unit that does them (``tl.dot`` products on wgmma where the SASS
has ``HGMMA``, at half the rate where its K loop waits for every wgmma group; on mma.sync
where it has ``HMMA``, else on the FMA pipes; elementwise work on the FMA pipes), times a
partial-wave penalty, plus a fixed gap per kernel. On the host:
the launch's measured time through Triton's launch path on this CPU (the driver's own call
excluded, :data:`RATES` ``driver_us`` added). An op's eager time replays its launches in
order, the device starting each launch when the host has issued it and the previous one has
ended; its CUDA-graph time is its device time alone.

Everything here is a prediction: caches (L2 holds 50 MB on an H100/H200: small re-reads hit
it), clocks, contention between concurrent programs, instruction latency and the memory
system's behaviour on strided access are left out.
"""

from __future__ import annotations

import math

#: The rates the model divides by, each with where it comes from.
RATES = {
    "copy_bytes_per_s": 4.24e12,  # H200, measured copy bandwidth (BENCHMARKS.md, 2026-11-30)
    "wgmma_tf32_flops": 400e12,  # H200 tf32 on wgmma, sustained (495 dense peak, datasheet)
    "mma_sync_tf32_flops": 200e12,  # mma.sync (HMMA) on Hopper: assumed half of wgmma's
    "fma_flops": 60e12,  # fp32 FMA pipes, sustained (67 peak, datasheet)
    "serial_wgmma": 0.5,  # share of the wgmma rate a K loop reaches that waits for each group
    "sms": 132,
    "gap_us": 1.5,  # device time between dependent kernels (assumed)
    "driver_us": 2.0,  # cuLaunchKernelEx on the host (assumed; not timed here)
    "torch_op_us": 6.0,  # host time of one eager ATen op with its launch (assumed)
    "public_call_us": 8.0,  # the library's eager path per public op call, with autograd
    # (BENCHMARKS.md "host time per op call": 8.0 us, this project's 2-core CPU)
}
RATE_SOURCES = {
    "copy_bytes_per_s": "H200 copy bandwidth measured in the GPU round (BENCHMARKS.md)",
    "wgmma_tf32_flops": "H200 tf32 wgmma, sustained estimate (dense peak 495 TFLOP/s)",
    "mma_sync_tf32_flops": "assumption: half the wgmma rate",
    "serial_wgmma": "assumption: no overlap of a group's loads and issue with the previous "
                    "group's products (to be measured by the GPU round)",
    "fma_flops": "H200 fp32 FMA, sustained estimate (peak 67 TFLOP/s)",
    "gap_us": "assumption: one kernel's ramp and drain between dependent launches",
    "driver_us": "assumption: the driver's launch call (the fake driver's is free)",
    "torch_op_us": "assumption: one eager PyTorch op on a GPU",
    "public_call_us": "measured: bench_host_overhead, Triton public op with autograd",
}

#: fwd + bwd targets (ms) at the benchmark shapes on an H200 (BENCHMARKS.md; the speed
#: issue's table for inter l1 and CRAM: 5x torch.compile's 1.91 ms, rounded down).
TARGET_MS = {
    "cosine_distances": 0.2, "intra_affinity_l2": 0.5, "intra_affinity_l1": 3.0,
    "inter_affinity_l2": 0.3, "inter_affinity_l1": 0.6, "distillation_l2": 1.5,
    "distillation_l1": 4.0, "cram": 0.38, "anomaly_map": 0.1,
}
#: Public op calls each workload makes (each costs ``public_call_us`` of host time).
PUBLIC_CALLS = {
    "cosine_distances": 3, "intra_affinity_l2": 3, "intra_affinity_l1": 3,
    "inter_affinity_l2": 2, "inter_affinity_l1": 2, "distillation_l2": 1,
    "distillation_l1": 1, "cram": 1, "anomaly_map": 1,
}
#: The newest GPU measurement of each op x backend: (ms, commit, card). The GPU round's
#: smoke step (scripts/gpu_smoke.py), round 2 of 2026-11-30.
MEASURED = {
    ("cosine_distances", "triton"): (3.47, "ba579d8", "H200"),
    ("cosine_distances", "cuda"): (1.73, "ba579d8", "H200"),
    ("intra_affinity_l2", "triton"): (4.58, "ba579d8", "H200"),
    ("intra_affinity_l2", "cuda"): (13.1, "ba579d8", "H200"),
    ("intra_affinity_l1", "triton"): (16.8, "ba579d8", "H200"),
    ("intra_affinity_l1", "cuda"): (83.2, "ba579d8", "H200"),
    ("inter_affinity_l2", "triton"): (5.43, "ba579d8", "H200"),
    ("inter_affinity_l2", "cuda"): (15.0, "ba579d8", "H200"),
    ("inter_affinity_l1", "triton"): (5.77, "ba579d8", "H200"),
    ("inter_affinity_l1", "cuda"): (15.0, "ba579d8", "H200"),
    ("distillation_l2", "triton"): (9.68, "ba579d8", "H200"),
    ("cram", "triton"): (1.82, "ba579d8", "H200"),
    ("cram", "cuda"): (0.889, "ba579d8", "H200"),
    ("anomaly_map", "triton"): (0.556, "ba579d8", "H200"),
    ("anomaly_map", "cuda"): (0.250, "ba579d8", "H200"),
}
#: Ops whose kernels are meant to stream memory (the byte bounds apply), with the bound
#: on distinct over ideal bytes.
BYTE_BOUND = {"cosine_distances": 1.5, "anomaly_map": 1.5, "cram": 1.5,
              "distillation_l2": 2.0, "distillation_l1": 2.0}


def wave_factor(programs: int, blocks_per_sm: int, sms: int = RATES["sms"]) -> float:
    """Penalty for partial waves: under one program per SM, the idle SMs; above, the idle
    slots of the last wave (``blocks_per_sm`` programs per SM at once)."""
    if programs <= 0:
        return 1.0
    if programs < sms:
        return sms / programs
    waves = programs / (max(blocks_per_sm, 1) * sms)
    return math.ceil(waves) / waves if waves > 1 else 1.0


def matrix_unit(kernel: dict | None) -> str:
    """Which unit runs a launch's ``tl.dot`` products: wgmma, mma_sync or fma."""
    if kernel is None:
        return "fma"
    if kernel["hgmma"]:
        return "wgmma"
    return "mma_sync" if kernel["hmma"] else "fma"


def launch_time(launch: dict, compiled: dict | None) -> dict:
    """Device and host microseconds of one launch (``compiled`` None for ATen ops)."""
    rate = {"wgmma": RATES["wgmma_tf32_flops"], "mma_sync": RATES["mma_sync_tf32_flops"],
            "fma": RATES["fma_flops"]}
    kernel = compiled["kernel_info"] if compiled else None
    unit = matrix_unit(kernel)
    if unit == "wgmma" and kernel["waits_all_in_loop"]:
        rate["wgmma"] *= RATES["serial_wgmma"]
    bytes_us = launch["read_distinct"] + launch["write_distinct"]
    bytes_us = bytes_us / RATES["copy_bytes_per_s"] * 1e6
    dot_us = launch["dot_flops"] / rate[unit] * 1e6
    fma_us = launch["fma_flops"] / RATES["fma_flops"] * 1e6
    if compiled:
        programs = math.prod(compiled["grid"])
        factor = wave_factor(programs, compiled["blocks_per_sm"])
        host = (compiled["host_us"] or 0.0) + RATES["driver_us"]
    else:
        programs, factor, host = None, 1.0, RATES["torch_op_us"]
    floor = max(bytes_us, dot_us, fma_us)
    bound = ("bytes" if floor == bytes_us else "tensor cores" if floor == dot_us and
             unit != "fma" else "fma")
    return {"device_us": floor * factor + RATES["gap_us"], "host_us": host, "unit": unit,
            "bound": bound, "programs": programs, "wave_factor": factor,
            "bytes_us": bytes_us, "dot_us": dot_us, "fma_us": fma_us}


def join(op: str, counted: dict, compiled: dict | None) -> list[dict]:
    """Each counted launch with its compiled launch: the i-th launch of a kernel in one pass
    is the i-th launch of that kernel in the other (the passes may interleave independent
    launches differently, never a kernel's own)."""
    queues: dict[str, list] = {}
    for launch in (compiled or {}).get("launches", []):
        queues.setdefault(launch["kernel"], []).append(launch)
    out = []
    for launch in counted["launches"]:
        match = None
        if launch["kind"] == "triton" and compiled is not None:
            queue = queues.get(launch["kernel"])
            if not queue:
                raise ValueError(f"{op}: {launch['kernel']} was counted more often than "
                                 "compiled: the two passes ran different plans")
            match = queue.pop(0)
        out.append(dict(launch, compiled=match, **launch_time(launch, match)))
    left = sorted(name for name, queue in queues.items() if queue)
    if left:
        raise ValueError(f"{op}: {', '.join(left)} compiled more often than counted")
    return out


def simulate(launches: list[dict], host_start_us: float) -> tuple[float, float]:
    """(eager, graph) microseconds: the host, busy for ``host_start_us`` with the op calls
    themselves, issues the launches in order; the device runs them in order."""
    host = host_start_us
    end = 0.0
    for launch in launches:
        host += launch["host_us"]
        end = max(end, host) + launch["device_us"]
    return end, sum(launch["device_us"] for launch in launches)


def totals(launches: list[dict]) -> dict:
    """An op's bytes and FLOPs from its launches (``unit`` decided per launch)."""
    return {
        "distinct_bytes": sum(x["read_distinct"] + x["write_distinct"] for x in launches),
        "requested_bytes": sum(x["read_requested"] + x["write_requested"] for x in launches),
        "flops": sum(x["dot_flops"] + x["fma_flops"] for x in launches),
        "tensor_core_flops": sum(x["dot_flops"] for x in launches if x["unit"] != "fma"),
        "fma_flops": sum(x["fma_flops"] + (x["dot_flops"] if x["unit"] == "fma" else 0)
                         for x in launches),
    }


def op_record(op: str, counted: dict, compiled: dict | None) -> dict:
    """One op x Triton record of the model (the JSON keys of ``--json``)."""
    launches = join(op, counted, compiled)
    eager_us, graph_us = simulate(launches, PUBLIC_CALLS[op] * RATES["public_call_us"])
    dots = [x for x in launches if x["dot_flops"] > 0]
    measured = MEASURED.get((op, "triton"), (None, None, None))
    kernels = [x["compiled"]["kernel_info"] for x in launches if x["compiled"]]
    return {
        "op": op, "backend": "triton",
        "launches": len(launches),
        "triton_launches": sum(x["kind"] == "triton" for x in launches),
        "host_us": sum(x["host_us"] for x in launches) + PUBLIC_CALLS[op] * RATES[
            "public_call_us"],
        **totals(launches),
        "ideal_bytes": counted["ideal_bytes"],
        "tensor_core": (all(x["unit"] == "wgmma" for x in dots) if dots else None),
        "spills": any(k["local_bytes"] > 0 for k in kernels) if compiled else None,
        "max_args": max((x["compiled"]["args"] for x in launches if x["compiled"]),
                        default=0),
        # launches made through Triton's binder at every call (not the pre-bound launcher)
        "unbound_launches": sum(1 for x in launches
                                if x["compiled"] and not x["compiled"].get("bound")),
        "predicted_ms": eager_us / 1e3,
        "predicted_graph_ms": graph_us / 1e3,
        "target_ms": TARGET_MS[op],
        "measured_ms": measured[0], "measured_commit": measured[1],
        "measured_card": measured[2],
        "detail": launches,
    }


#: C++ op calls each CUDA workload makes through the dispatcher (a forward and a backward
#: per public call; the map: distances, then combine).
CUDA_OP_CALLS = {op: 2 * calls for op, calls in PUBLIC_CALLS.items()}
CUDA_OP_CALLS.update({"anomaly_map": 2, "distillation_l2": 16, "distillation_l1": 16})


def cuda_launch_time(launch: dict, facts: dict | None, blocks_per_sm) -> dict:
    """Device and host microseconds of one CUDA-backend launch. ``facts``: the kernel's sm_90
    facts (None for ATen and library calls: their GEMMs at the FMA rate, cuBLAS's fp32
    kernels with TF32 off, PyTorch's default, unless the call names its ``unit``: the Gram
    path's tf32 cuBLAS products, on wgmma on Hopper); ``blocks_per_sm(facts, threads)``."""
    per_sm = None
    if launch["kind"] == "aten":
        unit, programs, factor = launch.get("unit", "fma"), None, 1.0
        host = RATES["torch_op_us"]
    else:
        unit = ("wgmma" if facts and facts["hgmma"] else
                "mma_sync" if facts and facts["hmma"] and launch["dot_flops"] else "fma")
        programs = math.prod(launch["grid"])
        per_sm = blocks_per_sm(facts, math.prod(launch["block"])) if facts else 1
        factor, host = wave_factor(programs, per_sm), RATES["driver_us"]
    rate = {"wgmma": RATES["wgmma_tf32_flops"], "mma_sync": RATES["mma_sync_tf32_flops"],
            "fma": RATES["fma_flops"]}[unit]
    bytes_us = (launch["read_distinct"] + launch["write_distinct"]) / RATES[
        "copy_bytes_per_s"] * 1e6
    dot_us = launch["dot_flops"] / rate * 1e6
    fma_us = launch["fma_flops"] / RATES["fma_flops"] * 1e6
    floor = max(bytes_us, dot_us, fma_us)
    bound = "bytes" if floor == bytes_us else "tensor cores" if (
        floor == dot_us and unit != "fma") else "fma"
    return {"device_us": floor * factor + RATES["gap_us"], "host_us": host, "unit": unit,
            "bound": bound, "programs": programs, "blocks_per_sm": per_sm,
            "wave_factor": factor, "bytes_us": bytes_us, "dot_us": dot_us, "fma_us": fma_us}


def cuda_record(op: str, counted: dict | None = None, facts: dict | None = None,
                dispatch_us: float | None = None) -> dict:
    """One op x CUDA record: from the emulation's counts (:mod:`.cuda`) and the kernels' sm_90
    facts (:mod:`.cuda_sass`) where they were made, else the measurement alone."""
    measured = MEASURED.get((op, "cuda"), (None, None, None))
    base = {"op": op, "backend": "cuda", "target_ms": TARGET_MS[op],
            "measured_ms": measured[0], "measured_commit": measured[1],
            "measured_card": measured[2]}
    if counted is None:
        none = dict.fromkeys(("launches", "host_us", "distinct_bytes", "requested_bytes",
                              "ideal_bytes", "flops", "tensor_core", "spills", "predicted_ms",
                              "predicted_graph_ms"))
        return {**base, **none, "not_modelled": "no CUDA counts in this run (python -m "
                "snl_kernels.perf --cuda counts them in the CPU emulation)"}
    from .cuda_sass import blocks_per_sm

    facts = facts or {}
    launches = []
    for launch in counted["launches"]:
        kernel = facts.get(launch["kernel"]) if launch["kind"] == "cuda" else None
        launches.append(dict(launch, facts=kernel,
                             **cuda_launch_time(launch, kernel, blocks_per_sm)))
    calls_us = PUBLIC_CALLS[op] * RATES["public_call_us"] + CUDA_OP_CALLS[op] * (
        dispatch_us or 0.0)
    eager_us, graph_us = simulate(launches, calls_us)
    ours = [x for x in launches if x["kind"] == "cuda"]
    products = [x for x in ours if x["dot_flops"] + x["fma_flops"] > 0]
    known = all(x["facts"] for x in ours) and bool(facts)
    library = any(x["kind"] == "aten" and x["dot_flops"] for x in launches)
    return {
        **base,
        "launches": len(launches), "cuda_launches": len(ours),
        "host_us": calls_us + sum(x["host_us"] for x in launches),
        **totals(launches),
        "ideal_bytes": counted["ideal_bytes"],
        # HGMMA everywhere, or null where a library picks its kernels at run time
        "tensor_core": (None if library or not known or not products else
                        all(x["unit"] == "wgmma" for x in products)),
        "spills": any(x["facts"]["local_bytes"] > 0 for x in ours) if known else None,
        "max_args": None,
        "unbound_launches": None,
        "predicted_ms": eager_us / 1e3,
        "predicted_graph_ms": graph_us / 1e3,
        "sampled_blocks": counted.get("blocks"),
        "detail": launches,
    }
