"""Held-out normal training images and the cut-paste probes built from them (the self-check).

``snl train`` keeps part of each class's ``train/good`` images out of training
(:func:`split_holdout`) and, after training, scores them against cut-paste probes made from
them (:func:`make_holdout_probes`); :mod:`snl.selfcheck` turns the scores into one probe
image AUROC per class. Nothing here needs a label or a test image.

Held out per class: ``max(minimum, ceil(HOLDOUT_FRACTION * n))`` of its ``n`` training
images (``minimum`` 8 by default), never more than half of them (so that a tiny class still
trains on as many images as it holds out). Which ones is drawn from
``default_rng([seed, crc32(class), 0])``: the same files whatever the training seed, so
that runs of several seeds (``snl train --restarts``, ``snl compare``) are checked on the
same images.

Probes: :data:`PROBES_PER_IMAGE` per held-out image, each a rectangle (side 15% to 35% of
the image, as :mod:`snl.data.probes`) cut from a lender image and pasted at a random place
of the held-out image; the mask is the rectangle. In multi-class training the lender is a
held-out image of another class (random class, random image); with one class (or when no
other class has a held-out image) it is another held-out image of the same class (the
image itself when it is the only one), and the
rectangle goes to another place than the one it was cut from, as CutPaste does. Probe ``i``
of a class draws everything from ``default_rng([seed, crc32(class), 1, i])``: the same
files, size and seed give the same probes, bit for bit.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .folders import _select, train_images
from .probes import _cutpaste, _read

#: Least number of training images held out per class (``snl train --holdout``).
HOLDOUT_MIN = 8
#: Least fraction of each class's training images held out.
HOLDOUT_FRACTION = 0.1
#: Cut-paste probes made from each held-out image.
PROBES_PER_IMAGE = 4

_PLACE_TRIES = 100  # draws of a target rectangle distinct from its source (one class)


def holdout_count(n: int, minimum: int = HOLDOUT_MIN) -> int:
    """How many of a class's ``n`` training images are held out.

    ``max(minimum, ceil(HOLDOUT_FRACTION * n))``, capped at ``n // 2``.

    Raises:
        ValueError: ``n`` or ``minimum`` below 0 (``minimum`` below 1 is no hold-out at all,
            which is the caller's choice to make, not this function's).
    """
    if n < 0 or minimum < 1:
        raise ValueError(f"holdout_count needs n >= 0 and minimum >= 1, got n={n}, "
                         f"minimum={minimum}")
    return min(max(minimum, math.ceil(HOLDOUT_FRACTION * n)), n // 2)


class Holdout(NamedTuple):
    """The held-out images of the training classes."""

    held: dict[str, list[Path]]  #: class -> its held-out ``train/good`` files, sorted
    counts: dict[str, int]  #: class -> its number of ``train/good`` images before the split

    def excluded(self) -> set[Path]:
        """Every held-out file (what training leaves out)."""
        return {p for paths in self.held.values() for p in paths}


def split_holdout(root: str | os.PathLike, classes: str | Sequence[str] = "all",
                  minimum: int = HOLDOUT_MIN, seed: int = 0) -> Holdout:
    """Choose the held-out training images of each class (see the module docstring).

    Args:
        root: data set folder (``root/<class>/train/good``) or one class's folder.
        classes: ``"all"``, a class name or a list of names: the training classes.
        minimum: least number held out per class (before the cap at half the images).
        seed: seed of the choice (not the training seed: the split stays put across seeds).

    Raises:
        DatasetError: as :class:`~snl.data.TrainDataset` (missing folder, unknown class,
            no image).
        ValueError: ``minimum`` below 1.
    """
    if minimum < 1:
        raise ValueError(f"holdout minimum must be >= 1, got {minimum}")
    held, counts = {}, {}
    for name, folder in _select(root, classes).items():
        images = train_images(name, folder)
        k = holdout_count(len(images), minimum)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 0])
        picked = sorted(int(i) for i in rng.choice(len(images), size=k, replace=False))
        held[name] = [images[i] for i in picked]
        counts[name] = len(images)
    return Holdout(held, counts)


class ProbeSet(NamedTuple):
    """One class's held-out images and their probes, as float32 RGB in 0..255."""

    normals: np.ndarray  #: (n, H, W, 3) the held-out images
    probes: np.ndarray  #: (m, H, W, 3) cut-paste probes, m = PROBES_PER_IMAGE * n
    masks: np.ndarray  #: (m, H, W) bool, the pasted rectangles
    sources: list[dict]  #: per probe: base and lender files, boxes ``[y, x, h, w]``


def _lender(name: str, index: int, held: dict[str, list[Path]], rng: np.random.Generator):
    """(class, file) a probe of ``held[name][index]`` takes its patch from."""
    others = [c for c in held if c != name and held[c]]
    if others:
        source = others[int(rng.integers(len(others)))]
        return source, held[source][int(rng.integers(len(held[source])))]
    rest = [p for j, p in enumerate(held[name]) if j != index] or held[name]
    return name, rest[int(rng.integers(len(rest)))]


def make_holdout_probes(holdout: Holdout, size: int, seed: int = 0,
                        root: str | os.PathLike | None = None) -> dict[str, ProbeSet]:
    """The held-out images of every class and their cut-paste probes, in memory.

    Args:
        holdout: from :func:`split_holdout`; its classes lend each other their patches.
        size: side of the images, in pixels (read and resized as training reads them).
        seed: seed of the probes' random streams.
        root: the data set folder; ``sources`` name files relative to it when given.

    Returns:
        ``{class: ProbeSet}`` for every class with at least one held-out image.

    Raises:
        DatasetError: a held-out file cannot be read.
    """
    def rel(path: Path) -> str:
        return str(path.relative_to(root)) if root is not None else str(path)

    cache: dict[Path, np.ndarray] = {}

    def read(path: Path) -> np.ndarray:
        if path not in cache:
            cache[path] = _read(path, size)
        return cache[path]

    result = {}
    for name, paths in holdout.held.items():
        if not paths:
            continue
        normals = np.stack([read(p) for p in paths])
        probes, masks, sources = [], [], []
        for i in range(PROBES_PER_IMAGE * len(paths)):
            index = i % len(paths)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1, i])
            source, lender = _lender(name, index, holdout.held, rng)
            for _ in range(_PLACE_TRIES):
                image, mask, boxes = _cutpaste(normals[index], read(lender), rng)
                if source != name or boxes["from_box"] != boxes["to_box"]:
                    break
            probes.append(image)
            masks.append(mask)
            sources.append({"base": rel(paths[index]), "other_class": source,
                            "other": rel(lender), **boxes})
        result[name] = ProbeSet(normals, np.stack(probes), np.stack(masks), sources)
    return result


def to_model_input(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(n, H, W, 3) float RGB in 0..255 -> (n, 3, H, W) float32 normalised as
    :func:`~snl.data.load_image` normalises a file."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / 255.0)
    x = x.permute(0, 3, 1, 2)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()
