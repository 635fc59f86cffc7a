"""Cross-class probes: normal images of one class mixed with another class's normal images.

A model that learns several classes at once may reconstruct one class's texture where
another's belongs (cross-class interference). Two probes measure it, scored like any
defect type (good vs probe images; pixel metrics with the probe masks):

- ``mixup``: a normal image of the evaluated class blended 50/50 with a normal image of
  another class; the whole image is anomalous (mask all ones).
- ``cutpaste``: a rectangle cut from another class's normal image (side 15% to 35% of the
  image, random place in both images) pasted into a normal image of the evaluated class;
  the mask is the rectangle.

Both images come from the ``test/good`` folders of the data set, so that neither the base
nor the pasted texture was seen in training; a class without test ``good`` images lends its
``train/good`` images instead (and ``dataset.json`` says so). Every probe image has its own
random stream, ``default_rng([seed, crc32(class), kind, index])``: the same data set, seed,
size and count give byte-identical files.

:func:`make_probes` writes them in the MVTec AD layout (``<class>/test/<kind>/NNN.png``,
``<class>/ground_truth/<kind>/NNN_mask.png``), so that :class:`~snl.data.TestDataset`
reads them like any defect folder, with a ``probes.json`` recording the parameters and
the sources of every image.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .folders import GOOD, DatasetError, _class_folders, _images_in
from .textures import read_manifest

#: Probe kinds, in table order.
PROBE_KINDS = ("mixup", "cutpaste")

_GENERATOR = "snl.data.probes"
_VERSION = 1  # bump whenever the same parameters would give different bytes
_MANIFEST = "probes.json"
_MIX = 0.5  # mixup's weight of the other class's image
_PATCH = (0.15, 0.35)  # cutpaste rectangle side, as a fraction of the image side


def parse_kinds(text: str | Sequence[str] | None) -> list[str]:
    """Probe kinds from ``"mixup,cutpaste"`` (or a list); ``[]`` for None / ``""`` / ``"none"``.

    Raises:
        ValueError: an unknown kind (the message names it and the known ones).
    """
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    kinds = [k.strip() for k in items if k.strip() and k.strip() != "none"]
    unknown = [k for k in kinds if k not in PROBE_KINDS]
    if unknown:
        raise ValueError(f"unknown probe {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(PROBE_KINDS)}")
    return list(dict.fromkeys(kinds))


def _normal_images(folder: Path) -> tuple[list[Path], str]:
    """A class's normal images not used in training (test/good), else its train/good ones."""
    for split in ("test", "train"):
        good = folder / split / GOOD
        images = _images_in(good) if good.is_dir() else []
        if images:
            return images, f"{split}/{GOOD}"
    raise DatasetError(f"class folder {folder} has no normal images in test/good or train/good")


def _read(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32)


def _mixup(base: np.ndarray, other: np.ndarray, rng: np.random.Generator):
    del rng  # a fixed 50/50 blend: nothing to draw
    image = (1.0 - _MIX) * base + _MIX * other
    return image, np.ones(base.shape[:2], dtype=bool), {"weight": _MIX}


def _cutpaste(base: np.ndarray, other: np.ndarray, rng: np.random.Generator):
    size = base.shape[0]
    h, w = (max(2, round(float(rng.uniform(*_PATCH)) * size)) for _ in range(2))
    sy, sx = (int(rng.integers(0, size - d + 1)) for d in (h, w))
    ty, tx = (int(rng.integers(0, size - d + 1)) for d in (h, w))
    image = base.copy()
    image[ty:ty + h, tx:tx + w] = other[sy:sy + h, sx:sx + w]
    mask = np.zeros(base.shape[:2], dtype=bool)
    mask[ty:ty + h, tx:tx + w] = True
    return image, mask, {"from_box": [sy, sx, h, w], "to_box": [ty, tx, h, w]}


_MAKERS = {"mixup": _mixup, "cutpaste": _cutpaste}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _build(data_root: Path, out: Path, params: dict) -> dict:
    folders = _class_folders(data_root)
    size, seed, count = params["size"], params["seed"], params["count"]
    normals = {name: _normal_images(folder) for name, folder in folders.items()}
    sources: dict[str, dict[str, dict]] = {}
    for name in params["classes"]:
        others = [c for c in folders if c != name]
        base_images, _ = normals[name]
        for kind in params["kinds"]:
            for i in range(count):
                rng = np.random.default_rng(
                    [seed, zlib.crc32(name.encode()), PROBE_KINDS.index(kind), i])
                base_path = base_images[int(rng.integers(len(base_images)))]
                source = others[int(rng.integers(len(others)))]
                other_images = normals[source][0]
                other_path = other_images[int(rng.integers(len(other_images)))]
                image, mask, extra = _MAKERS[kind](_read(base_path, size),
                                                  _read(other_path, size), rng)
                stem = f"{i:03d}"
                rel = f"test/{kind}/{stem}.png"
                _save(np.clip(np.round(image), 0, 255).astype(np.uint8), out / name / rel)
                _save(mask.astype(np.uint8) * 255,
                      out / name / "ground_truth" / kind / f"{stem}_mask.png")
                sources.setdefault(name, {})[rel] = {
                    "base": str(base_path.relative_to(data_root)),
                    "other_class": source,
                    "other": str(other_path.relative_to(data_root)), **extra}
    return {"generator": _GENERATOR, "version": _VERSION, "params": params,
            "normal_images": {name: split for name, (_, split) in normals.items()},
            "sources": sources}


def _read_manifest(root: Path) -> dict | None:
    return read_manifest(root / _MANIFEST, _GENERATOR)


def make_probes(data_root: str | os.PathLike, out: str | os.PathLike,
                classes: str | Sequence[str] = "all", kinds: Sequence[str] = PROBE_KINDS,
                seed: int = 0, size: int = 128, count: int = 8) -> Path:
    """Write (or find already written) the cross-class probe images of a data set.

    Args:
        data_root: data set folder (MVTec AD / VisA layout) with at least two classes:
            the other classes lend their normal images, whether or not they are evaluated.
        out: folder of the probe set (replaced if it holds probes made with other
            parameters; never a folder that was not made by this function).
        classes: the classes that get probes: ``"all"``, a name or a list of names.
        kinds: among ``PROBE_KINDS``.
        seed: seed of every random choice (which images, which class, where the patch goes).
        size: side of the written images and masks, in pixels.
        count: images per class and kind.

    Returns:
        ``out``, a folder that :class:`~snl.data.TestDataset` reads (its classes hold only
        probe folders, no ``good`` one).

    Raises:
        DatasetError: fewer than two classes, an unknown class, a class without normal
            images, ``out`` holds something else, or bad arguments.
        ValueError: an unknown kind.
    """
    data_root, out = Path(data_root), Path(out)
    kinds = parse_kinds(list(kinds))
    if not kinds:
        raise ValueError("kinds is empty: pass some of " + ", ".join(PROBE_KINDS))
    if size < 8 or count < 1:
        raise DatasetError(f"probes need size >= 8 and count >= 1, got size={size}, "
                           f"count={count}")
    available = list(_class_folders(data_root))
    wanted = available if classes == "all" else (
        [classes] if isinstance(classes, str) else list(classes))
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetError(f"unknown class {', '.join(map(repr, unknown))} in {data_root}; "
                           f"available: {', '.join(available)}")
    if len(available) < 2:
        raise DatasetError(
            f"cross-class probes need a data set with at least two classes; {data_root} has "
            f"{', '.join(available)} only")
    params = {"data_root": str(data_root.resolve()), "classes": wanted, "kinds": kinds,
              "seed": int(seed), "size": int(size), "count": int(count)}
    if out.exists():
        manifest = _read_manifest(out)
        if manifest is not None and manifest.get("version") == _VERSION \
                and manifest.get("params") == params:
            return out
        if manifest is None and (not out.is_dir() or any(out.iterdir())):
            raise DatasetError(f"{out} exists and is not a probe set made by snl (no valid "
                               f"{_MANIFEST}); choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _build(data_root, tmp, params)
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
