"""Data sets: MVTec AD / VisA folders, and the embedded default made from scikit-image textures.

``TrainDataset`` and ``TestDataset`` read any folder in the MVTec AD or VisA (1-class
split) layout; ``make_default_dataset`` writes the default set, in the MVTec layout, from
texture photographs that ship inside scikit-image (no download); ``make_probes`` writes
the cross-class probes (Mixup, CutPaste) of any data set with two classes or more;
``split_holdout`` and ``make_holdout_probes`` the self-check's held-out training images and
their cut-paste probes.
"""

from .folders import (
    GOOD,
    IMAGE_EXTENSIONS,
    DatasetError,
    Sample,
    TestDataset,
    TrainDataset,
    check_dataset,
    list_classes,
    load_image,
    load_mask,
)
from .holdout import HOLDOUT_MIN, Holdout, make_holdout_probes, split_holdout
from .probes import PROBE_KINDS, make_probes, parse_kinds
from .textures import DEFAULT_CLASSES, DEFECT_TYPES, TEXTURES, default_root, make_default_dataset

__all__ = [
    "DEFAULT_CLASSES",
    "DEFECT_TYPES",
    "GOOD",
    "HOLDOUT_MIN",
    "IMAGE_EXTENSIONS",
    "PROBE_KINDS",
    "TEXTURES",
    "DatasetError",
    "Holdout",
    "Sample",
    "TestDataset",
    "TrainDataset",
    "check_dataset",
    "default_root",
    "list_classes",
    "load_image",
    "load_mask",
    "make_default_dataset",
    "make_holdout_probes",
    "make_probes",
    "parse_kinds",
    "split_holdout",
]
