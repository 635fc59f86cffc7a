"""Data-parallel training under ``torchrun``: process group, ranks, sharding, gathering.

``torchrun --nproc_per_node=N -m snl train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on GPUs, gloo on CPUs).
A plain ``snl train`` runs as a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str | None = None) -> World:
    """Join the process group when launched by torchrun; choose this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather_cat(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor (first dimension may differ) over ranks, in rank order."""
    if not world.distributed:
        return tensor
    backend_device = tensor.device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = tensor.to(backend_device)
    n = torch.tensor([local.shape[0]], device=backend_device)
    sizes = [torch.zeros_like(n) for _ in range(world.size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=backend_device)
    padded[: local.shape[0]] = local
    chunks = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes, strict=True)])


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(world: World, obj):
    """Rank 0's ``obj`` (any picklable object) on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(world: World, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart between DDP's
    per-forward broadcasts), so that all ranks hold the model that rank 0 saves."""
    if not world.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
