"""What every command prints: a progress bar and log lines, on rank 0 only."""

from __future__ import annotations

import sys

from .. import distributed


def progress(iterable, world: distributed.World, **kwargs):
    """A tqdm progress bar on rank 0 (stderr); the bare iterable elsewhere."""
    if not world.is_main:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, file=sys.stderr, **kwargs)


def log(world: distributed.World, message: str) -> None:
    """Print ``message`` on rank 0 (stdout, flushed)."""
    if world.is_main:
        print(message, flush=True)
