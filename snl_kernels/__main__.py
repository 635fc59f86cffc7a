"""``python -m snl_kernels``: versions, device, and which backend can run each op, or why not."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from . import __version__, _cuda, dispatch

# The op modules (their names are shadowed by the op functions in the package namespace).
OPS = tuple(
    importlib.import_module(f"snl_kernels.{name}")
    for name in ("cosine_distances", "intra_affinity_loss", "inter_affinity_loss", "cram",
                 "anomaly_map")
)


def report() -> str:
    lines = [
        f"snl-kernels {__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'no, CPU build'})",
    ]
    try:
        import triton

        lines.append(f"triton      {triton.__version__}"
                     + (" (CPU interpreter: TRITON_INTERPRET=1)"
                        if dispatch.triton_interpreted() else ""))
    except Exception as exc:
        lines.append(f"triton      unavailable ({type(exc).__name__}: {exc})")
    if torch.cuda.is_available():
        device = "cuda"
        name = torch.cuda.get_device_name(0)
        cap = torch.cuda.get_device_capability(0)
        lines.append(f"device      {name} (sm_{cap[0]}{cap[1]}), "
                     f"{torch.cuda.device_count()} visible")
    else:
        device = "cpu"
        lines.append("device      CPU only (torch.cuda.is_available() is False)")
    ext = "loaded" if _cuda.load() else f"not available: {_cuda.load_error()}"
    lines.append(f"extension   snl_kernels._C {ext}")
    lines.append(f"SNL_BACKEND {dispatch.requested_backend(None) or 'auto'}")
    lines.append("")
    lines.append(f"backends on {device} tensors (automatic mode on CUDA tensors: the first "
                 "available of the op's order, else torch):")
    for module in OPS:
        reasons = dispatch.availability(module.OP, module.IMPLEMENTED, device)
        order = dispatch.AUTO_ORDER.get(module.OP, ("cuda", "triton"))
        lines.append(f"  {module.OP} (order: {', '.join(order)})")
        for backend, why in reasons.items():
            state = "available" if not why else "unavailable: " + "; ".join(why)
            lines.append(f"    {backend:<7} {state}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
