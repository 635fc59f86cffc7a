"""The embedded default data set: texture photographs from scikit-image, synthetic defects.

Nothing is downloaded. The photographs are PNG files inside the scikit-image wheel
(``skimage/data/``), read straight from the installed package; ``skimage.data``'s
functions are never called, because some of them fetch files over the network.

=========  =====================  ==========================================================
class      file                   what, licence
=========  =====================  ==========================================================
brick      brick.png              brick wall, 512x512 grey (CC0Textures Bricks25, CC0)
grass      grass.png              grass, 512x512 grey (DeviantArt linolafett Grass-01, CC0)
gravel     gravel.png             gravel, 512x512 grey (CC0Textures Gravel04, CC0)
tissue     ihc.png                colonic glands, IHC staining, 512x512 RGB (CMMI; no known
                                  copyright restrictions)
=========  =====================  ==========================================================

Each photograph is split into two disjoint bands of rows: train crops come from the top
band and test crops from the bottom one (its height is 30% of the photograph, at least one
crop), so no test pixel was ever seen in training. A crop is a ``crop x crop`` window at
a random position in its band, resized to ``size x size`` when the two differ, stored as
RGB (grey photographs repeat their channel). Defects are drawn at the output size, and the
mask is exactly the set of pixels a defect wrote:

- ``scratch``: a thin quadratic Bézier curve, light or dark, 1 to 3 px wide (x size/128);
- ``hole``: a dark, blurred irregular blob (hard edge, darker inside);
- ``stain``: a colour-shifted irregular blob whose strength fades towards its edge (never
  below 30% inside the mask, zero outside);
- ``foreign``: an irregular patch of another class's photograph (taken from that class's
  test band): the cross-class case, normal texture in the wrong place.

Written in the MVTec AD layout (``<class>/train/good``, ``<class>/test/{good,<defect>}``,
``<class>/ground_truth/<defect>/<name>_mask.png``) with a ``dataset.json`` that records the
parameters, the crop box of every image and the source of every foreign patch. Every image
has its own random stream, ``default_rng([seed, class, split, index])``, so the same
parameters give byte-identical files, and changing one count leaves the other images as
they were.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .folders import DatasetError

#: Class name -> file inside ``skimage/data/``.
TEXTURES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
            "tissue": "ihc.png"}
DEFAULT_CLASSES = tuple(TEXTURES)
DEFECT_TYPES = ("scratch", "hole", "stain", "foreign")

_GENERATOR = "snl.data.textures"
_VERSION = 1  # bump whenever the same parameters would give different bytes
_TEST_BAND = 0.3  # fraction of each photograph's rows kept for test crops
_MANIFEST = "dataset.json"
_SPLITS = {"train": 0, "test_good": 1, "scratch": 2, "hole": 3, "stain": 4, "foreign": 5}


def default_root() -> Path:
    """Where the command line keeps the default data set: ``$XDG_CACHE_HOME/snl/textures``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "snl" / "textures"


def _photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photograph of a class, read from the installed scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the default data set is cut from photographs shipped inside scikit-image, which "
            "is not installed: pip install scikit-image")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / TEXTURES[name]
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise DatasetError(f"cannot read the texture photograph {path}: {exc}") from exc


def _bands(height: int, crop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row ranges ``[start, stop)`` of the train and test bands."""
    test_rows = max(crop, round(_TEST_BAND * height))
    split = height - test_rows
    if split < crop:
        raise DatasetError(
            f"crop {crop} px is too large for a {height}-row photograph: the train and test "
            f"bands need {crop} + {test_rows} rows; use crop <= {height // 2}")
    return (0, split), (split, height)


def _cut(photo: np.ndarray, band: tuple[int, int], crop: int, size: int,
         rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """A random crop x crop window inside a band of rows, resized to size x size."""
    y = int(rng.integers(band[0], band[1] - crop + 1))
    x = int(rng.integers(0, photo.shape[1] - crop + 1))
    window = photo[y:y + crop, x:x + crop]
    if crop != size:
        window = np.asarray(Image.fromarray(window).resize((size, size), Image.Resampling.LANCZOS))
    return window.astype(np.float32) / 255.0, [y, x, crop, crop]


def _blob(rng: np.random.Generator, size: int, radius: tuple[float, float]) -> np.ndarray:
    """(size, size) bool irregular blob: a polygon whose radius wobbles with the angle."""
    r0 = rng.uniform(*radius) * size
    cy, cx = rng.uniform(r0, size - r0, 2)
    theta = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    wobble = sum(rng.uniform(0, 0.4 / k) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
                 for k in (2, 3, 5))
    r = r0 * (1.0 + wobble)
    points = list(zip((cx + r * np.cos(theta)).tolist(), (cy + r * np.sin(theta)).tolist(),
                      strict=True))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(mask).astype(np.float32)


def _scratch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    p0, p2 = rng.uniform(0.1 * size, 0.9 * size, (2, 2))
    while np.hypot(*(p2 - p0)) < 0.3 * size:
        p2 = rng.uniform(0.1 * size, 0.9 * size, 2)
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * size, 2)
    t = np.linspace(0.0, 1.0, 64)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(1, round(int(rng.integers(1, 4)) * size / 128))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in curve.tolist()], fill=1, width=width,
                                joint="curve")
    mask = np.asarray(canvas, dtype=bool)
    tone = rng.uniform(0.85, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.15)
    image[mask] = 0.15 * image[mask] + 0.85 * tone
    return mask


def _hole(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = _blob(rng, image.shape[0], (0.06, 0.14))
    blurred = ndimage.gaussian_filter(image, sigma=(2.5, 2.5, 0))
    depth = np.clip(_inner_distance(mask) / 4.0, 0.0, 1.0)[..., None]  # darker inside
    dark = blurred * (0.55 - 0.3 * depth) + 0.02
    image[mask] = dark[mask]
    return mask


def _stain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = _blob(rng, image.shape[0], (0.10, 0.22))
    tints = np.array([[1.35, 0.95, 0.55], [0.6, 0.9, 1.4], [1.3, 0.6, 0.7], [0.75, 1.3, 0.7]],
                     dtype=np.float32)
    tint = tints[rng.integers(len(tints))]
    shifted = np.clip(image * tint + (tint - 1.0) * 0.15, 0.0, 1.0)
    inner = _inner_distance(mask)
    alpha = 0.3 + 0.35 * np.clip(inner / max(1.0, float(inner.max()) / 2), 0.0, 1.0)
    alpha = alpha[..., None]
    image[mask] = ((1 - alpha) * image + alpha * shifted)[mask]
    return mask


def _foreign(image: np.ndarray, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = _blob(rng, image.shape[0], (0.10, 0.20))
    image[mask] = patch[mask]
    return mask


def _save_png(array: np.ndarray, path: Path) -> None:
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _build(out: Path, params: dict) -> dict:
    """Write every class under ``out``; returns the manifest."""
    size, crop, seed = params["size"], params["crop"], params["seed"]
    classes = params["classes"]
    photos = {name: _photo(name) for name in classes}
    bands = {name: _bands(photo.shape[0], crop) for name, photo in photos.items()}
    boxes: dict[str, dict[str, list[int]]] = {}
    foreign_sources: dict[str, dict[str, dict]] = {}
    for ci, name in enumerate(classes):
        train_band, test_band = bands[name]
        cls_dir = out / name
        cls_boxes = boxes.setdefault(name, {})
        counts = [("train", params["n_train"]), ("test_good", params["n_test_good"])]
        counts += [(defect, params["n_test_defect"]) for defect in DEFECT_TYPES]
        for split, count in counts:
            for i in range(count):
                rng = np.random.default_rng([seed, ci, _SPLITS[split], i])
                band = train_band if split == "train" else test_band
                image, box = _cut(photos[name], band, crop, size, rng)
                stem = f"{i:03d}"
                if split == "train":
                    rel = f"train/good/{stem}.png"
                elif split == "test_good":
                    rel = f"test/good/{stem}.png"
                else:
                    rel = f"test/{split}/{stem}.png"
                    if split == "foreign":
                        others = [c for c in classes if c != name] or [name]
                        source = others[int(rng.integers(len(others)))]
                        patch, source_box = _cut(photos[source], bands[source][1], crop, size,
                                                 rng)
                        mask = _foreign(image, patch, rng)
                        foreign_sources.setdefault(name, {})[rel] = {
                            "class": source, "box": source_box}
                    else:
                        mask = {"scratch": _scratch, "hole": _hole, "stain": _stain}[split](
                            image, rng)
                    _save_png(mask.astype(np.uint8) * 255,
                              cls_dir / "ground_truth" / split / f"{stem}_mask.png")
                _save_png(image, cls_dir / rel)
                cls_boxes[rel] = box
    return {"generator": _GENERATOR, "version": _VERSION, "params": params,
            "defects": list(DEFECT_TYPES),
            "sources": {name: f"skimage/data/{TEXTURES[name]}" for name in classes},
            "bands": {name: {"train_rows": list(b[0]), "test_rows": list(b[1])}
                      for name, b in bands.items()},
            "boxes": boxes, "foreign_sources": foreign_sources}


def read_manifest(path: Path, generator: str) -> dict | None:
    """The JSON manifest at ``path`` if ``generator`` wrote it, else None (missing,
    unreadable, or another program's file)."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == generator \
        else None


def _read_manifest(root: Path) -> dict | None:
    return read_manifest(root / _MANIFEST, _GENERATOR)


def _same(manifest: dict | None, params: dict) -> bool:
    return (manifest is not None and manifest.get("version") == _VERSION
            and manifest.get("params") == params)


def make_default_dataset(root: str | os.PathLike, seed: int = 0, size: int = 128,
                         crop: int | None = None, n_train: int = 80, n_test_good: int = 20,
                         n_test_defect: int = 8, classes: Sequence[str] | None = None,
                         overwrite: bool = False) -> list[str]:
    """Make (or find already made) the embedded default data set under ``root``.

    The set is built in a temporary folder beside ``root`` and moved into place in one
    rename, with ``dataset.json`` recording the parameters; a later call with the same
    parameters returns at once. Several processes may call it together (e.g. every rank
    of a distributed run): one rename wins, the others find its result.

    Args:
        root: folder of the data set (created; its parent must be writable).
        seed: seed of every random choice; same parameters give byte-identical files.
        size: side of the written images, in pixels (>= 32).
        crop: side of the window cut from the 512x512 photographs before resizing to
            ``size``; default ``size`` (capped at 256). Smaller windows zoom in.
        n_train: normal training images per class.
        n_test_good: normal test images per class.
        n_test_defect: test images per class and defect type (see ``DEFECT_TYPES``).
        classes: subset of ``DEFAULT_CLASSES`` (default all, in that order).
        overwrite: replace a default data set made under ``root`` with other parameters
            (never a folder that was not made by this function).

    Returns:
        The class names, in order.

    Raises:
        DatasetError: unknown class, bad sizes or counts, scikit-image missing, or ``root``
            holds something else (another folder, or a default set made with other
            parameters and ``overwrite`` is False).
    """
    classes = list(DEFAULT_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in TEXTURES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise DatasetError(
            f"classes must be distinct names among {', '.join(DEFAULT_CLASSES)}; got {classes}")
    crop = min(size, 256) if crop is None else crop
    if size < 32 or crop < 16:
        raise DatasetError(f"size must be >= 32 and crop >= 16 px, got size={size}, crop={crop}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 1:
        raise DatasetError(
            f"need n_train >= 1, n_test_good >= 0, n_test_defect >= 1; got {n_train}, "
            f"{n_test_good}, {n_test_defect}")
    params = {"seed": int(seed), "size": int(size), "crop": int(crop), "n_train": int(n_train),
              "n_test_good": int(n_test_good), "n_test_defect": int(n_test_defect),
              "classes": classes}
    root = Path(root)
    if root.exists():
        manifest = _read_manifest(root)
        if _same(manifest, params):
            return classes
        if manifest is None and (not root.is_dir() or any(root.iterdir())):
            raise DatasetError(
                f"{root} exists and is not a default data set made by snl (no valid "
                f"{_MANIFEST}); choose another folder")
        if manifest is not None and not overwrite:
            raise DatasetError(
                f"{root} holds a default data set made with other parameters "
                f"({manifest.get('params')}); pass overwrite=True to rebuild it, or choose "
                "another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        manifest = _build(tmp, params)
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        if root.exists() and _read_manifest(root) is not None and overwrite \
                and not _same(_read_manifest(root), params):
            shutil.rmtree(root)
        elif root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:
            if not _same(_read_manifest(root), params):  # not a concurrent maker's result
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return classes
