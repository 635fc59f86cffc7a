"""Image folders in the MVTec AD and VisA (1-class split) layouts, as torch data sets.

MVTec AD::

    root/<class>/train/good/*.png
    root/<class>/test/good/*.png
    root/<class>/test/<defect>/*.png
    root/<class>/ground_truth/<defect>/<stem>_mask.png

VisA after its 1-class split (``split_csv/1cls.csv`` of amazon-science/spot-diff)::

    root/<class>/train/good/*.JPG
    root/<class>/test/good/*.JPG
    root/<class>/test/bad/*.JPG
    root/<class>/ground_truth/bad/<stem>.png

One reader serves both: a test image in ``test/<defect>/<stem>.<ext>`` with ``<defect>``
other than ``good`` takes its mask from ``ground_truth/<defect>/<stem>_mask.png`` (MVTec)
or else ``ground_truth/<defect>/<stem>.png`` (VisA). Masks count as defect where non-zero
(VisA's raw masks hold small class ids, MVTec's 255). ``root`` may also be one class's
folder (``mvtec/bottle``). Image files are recognised by extension, case-insensitively
(``IMAGE_EXTENSIONS``), and listed in sorted order.

Images are read with Pillow as RGB, resized to ``size`` (bilinear, antialiased when
shrinking) and normalised with the ``mean`` and ``std`` the model gives. A mask is resized
as the fraction of each output pixel's area that is defect (box filter) and thresholded at
0.5, close to RD4AD's bilinear resize and threshold.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD = "good"

Size = int | tuple[int, int]


class DatasetError(ValueError):
    """A data set folder or file is missing, empty or unreadable; the message names it."""


class Sample(NamedTuple):
    """One image of a data set."""

    path: Path
    class_name: str
    defect: str  #: "good", or the defect folder's name
    mask_path: Path | None  #: None for good images


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _class_folders(root: str | os.PathLike) -> dict[str, Path]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data set root {root} does not exist or is not a folder")
    if (root / "train").is_dir() or (root / "test").is_dir():
        return {root.name: root}  # one class's own folder
    found = {d.name: d for d in sorted(root.iterdir())
             if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir())}
    if not found:
        raise DatasetError(
            f"no class folders in {root}: expected {root}/<class>/train/good and "
            f"{root}/<class>/test/<defect> (MVTec AD or VisA 1-class layout)")
    return found


def list_classes(root: str | os.PathLike) -> list[str]:
    """Names of the classes under ``root`` (folders holding ``train/`` or ``test/``), sorted.

    Raises:
        DatasetError: if ``root`` is missing or holds no class folder.
    """
    return list(_class_folders(root))


def _select(root: str | os.PathLike, classes: str | Sequence[str]) -> dict[str, Path]:
    available = _class_folders(root)
    if isinstance(classes, str):
        wanted = list(available) if classes == "all" else [classes]
    else:
        wanted = list(classes)
    if not wanted:
        raise DatasetError("no class selected: pass classes='all', a name, or a list of names")
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetError(
            f"unknown class {', '.join(map(repr, unknown))} in {root}; available: "
            f"{', '.join(available)}")
    return {c: available[c] for c in wanted}


def _find_mask(folder: Path, defect: str, image: Path) -> Path:
    truth = folder / "ground_truth" / defect
    candidates = [truth / f"{image.stem}_mask.png", truth / f"{image.stem}.png"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"missing mask for defect image {image}: looked for "
        f"{' and '.join(str(c) for c in candidates)}")


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def load_image(path: str | os.PathLike, size: Size, mean: Sequence[float],
               std: Sequence[float]) -> Tensor:
    """Read an image file as a normalised RGB tensor.

    Args:
        path: image file (any format Pillow reads; grey and RGBA become RGB).
        size: output side, or (H, W).
        mean: per-channel mean subtracted after scaling to [0, 1] (3 values).
        std: per-channel divisor (3 values).

    Returns:
        (3, H, W) float32 tensor.

    Raises:
        DatasetError: if the file cannot be read as an image.
    """
    h, w = _hw(size)
    image = _open(Path(path), "RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s).contiguous()


def load_mask(path: str | os.PathLike, size: Size) -> Tensor:
    """Read a ground-truth mask (non-zero = defect) at ``size``.

    Returns:
        (1, H, W) float32 tensor of 0 and 1: a pixel is 1 where at least half of the area
        it covers in the original mask is defect.

    Raises:
        DatasetError: if the file cannot be read as an image.
    """
    h, w = _hw(size)
    image = _open(Path(path), "L")
    defect = (np.asarray(image) > 0).astype(np.float32)
    if defect.shape != (h, w):
        defect = np.asarray(Image.fromarray(defect).resize((w, h), Image.Resampling.BOX))
    return torch.from_numpy((defect >= 0.5).astype(np.float32))[None]


class _FolderDataset(Dataset):
    def __init__(self, size: Size, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = _hw(size)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values, std > 0; got {mean}, {std}")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.samples: list[Sample] = []
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Tensor:
        return load_image(self.samples[index].path, self.size, self.mean, self.std)


def train_images(name: str, folder: Path) -> list[Path]:
    """Class ``name``'s normal training images (``folder/train/good``), sorted.

    Raises:
        DatasetError: the class has no training folder, or no image in it.
    """
    good = folder / "train" / GOOD
    if not good.is_dir():
        raise DatasetError(f"class {name!r} has no training folder {good}")
    images = _images_in(good)
    if not images:
        raise DatasetError(f"no images in {good} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return images


class TrainDataset(_FolderDataset):
    """Normal training images of one or several classes (their union, for multi-class).

    Items are (3, H, W) float32 tensors, normalised. ``samples`` lists the files with
    their class.

    Args:
        root: data set folder (``root/<class>/train/good``) or one class's folder.
        classes: ``"all"``, one class name, or a list of names.
        size: output side, or (H, W).
        mean: normalisation mean, 3 values (the model's).
        std: normalisation std, 3 values (the model's).
        exclude: files left out (the self-check's held-out images, :mod:`snl.data.holdout`).

    Raises:
        DatasetError: root missing, unknown class (the message lists the available ones),
            a class with no ``train/good`` folder or no image in it, or a class whose every
            image is excluded.
    """

    def __init__(self, root: str | os.PathLike, classes: str | Sequence[str] = "all", *,
                 size: Size, mean: Sequence[float], std: Sequence[float],
                 exclude: Collection[Path] = ()) -> None:
        super().__init__(size, mean, std)
        exclude = set(exclude)
        for name, folder in _select(root, classes).items():
            good = folder / "train" / GOOD
            images = [p for p in train_images(name, folder) if p not in exclude]
            if not images:
                raise DatasetError(f"every image in {good} is excluded from training")
            self.samples += [Sample(p, name, GOOD, None) for p in images]
            self.classes.append(name)

    def __getitem__(self, index: int) -> Tensor:
        return self._image(index)


class TestDataset(_FolderDataset):
    """Test images of one or several classes, with masks and labels.

    Items are dicts, which ``torch.utils.data.default_collate`` batches:
    ``image`` (3, H, W) float32 normalised; ``mask`` (1, H, W) float32 of 0 and 1 (zeros
    for good images); ``label`` int, 1 for a defect image; ``class_name``, ``defect``
    (``"good"`` or the defect folder's name) and ``path`` as str.

    Args:
        root: data set folder (``root/<class>/test/<defect>``) or one class's folder.
        classes: ``"all"``, one class name, or a list of names.
        size: output side, or (H, W).
        mean: normalisation mean, 3 values.
        std: normalisation std, 3 values.

    Raises:
        DatasetError: root missing, unknown class, a class with no ``test`` folder or no
            image in it, or a defect image without its mask (the message names the image
            and the mask files looked for).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, root: str | os.PathLike, classes: str | Sequence[str] = "all", *,
                 size: Size, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(size, mean, std)
        for name, folder in _select(root, classes).items():
            test = folder / "test"
            if not test.is_dir():
                raise DatasetError(f"class {name!r} has no test folder {test}")
            found = []
            for defect_dir in sorted(d for d in test.iterdir() if d.is_dir()):
                defect = defect_dir.name
                for path in _images_in(defect_dir):
                    mask = None if defect == GOOD else _find_mask(folder, defect, path)
                    found.append(Sample(path, name, defect, mask))
            if not found:
                raise DatasetError(
                    f"no images in {test}/<good|defect>/ (looked for "
                    f"{', '.join(IMAGE_EXTENSIONS)})")
            self.samples += found
            self.classes.append(name)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        if sample.mask_path is None:
            mask = torch.zeros(1, *self.size)
        else:
            mask = load_mask(sample.mask_path, self.size)
        return {"image": self._image(index), "mask": mask, "label": int(sample.defect != GOOD),
                "class_name": sample.class_name, "defect": sample.defect,
                "path": str(sample.path)}

    def labels(self) -> np.ndarray:
        """(len,) int64: 1 for defect images, 0 for good ones, without reading any file."""
        return np.array([int(s.defect != GOOD) for s in self.samples], dtype=np.int64)


def _header(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of an image file and None, or None and why it cannot be read.

    Pillow's ``verify`` checks the file's structure (for PNG every chunk's CRC) without
    decoding the pixels, so checking a whole data set costs little.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size, None
    except Exception as exc:  # Pillow raises many types for bad files
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def check_dataset(root: str | os.PathLike, classes: str | Sequence[str] = "all",
                  train: bool = True, test: bool = True) -> None:
    """Check a data set folder before any training or evaluation starts.

    Every image of the selected classes (``train/good`` with ``train``, ``test/*`` with
    ``test``) must be a readable image file, every defect image must have its mask, and
    every mask must be readable and have its image's width and height. All problems are
    collected and raised at once.

    Raises:
        DatasetError: the layout is wrong (as :class:`TrainDataset` and
            :class:`TestDataset` say), or a list of every bad file, one per line.
    """
    problems: list[str] = []
    for name, folder in _select(root, classes).items():
        groups: list[tuple[str, Path]] = []
        if train:
            good = folder / "train" / GOOD
            if not good.is_dir():
                problems.append(f"{good}: missing (class {name!r} has no training folder)")
            else:
                groups.append((GOOD, good))
        if test:
            test_dir = folder / "test"
            if not test_dir.is_dir():
                problems.append(f"{test_dir}: missing (class {name!r} has no test folder)")
            else:
                groups += [("test", d) for d in sorted(test_dir.iterdir()) if d.is_dir()]
        for kind, group in groups:
            images = _images_in(group)
            if kind == GOOD and not images:
                problems.append(f"{group}: no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
            for path in images:
                size, why = _header(path)
                if why:
                    problems.append(f"{path}: not a readable image ({why})")
                if kind == GOOD or group.name == GOOD:
                    continue
                try:
                    mask = _find_mask(folder, group.name, path)
                except DatasetError as exc:
                    problems.append(f"{path}: {exc}")
                    continue
                mask_size, why = _header(mask)
                if why:
                    problems.append(f"{mask}: not a readable mask ({why})")
                elif size is not None and mask_size != size:
                    problems.append(f"{mask}: mask is {mask_size[0]}x{mask_size[1]}, its image "
                                    f"{path.name} is {size[0]}x{size[1]}")
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in data set {root}:\n  "
                           + "\n  ".join(problems))
