"""snl.data: the embedded default data set (exact masks, no leakage, determinism, no network)
and the MVTec / VisA folder readers (layouts, resizing, normalisation, errors naming files).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from snl import data
from snl.data import textures

SMALL = {"size": 64, "n_train": 3, "n_test_good": 2, "n_test_defect": 2}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("default") / "textures"
    data.make_default_dataset(root, seed=3, **SMALL)
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_default_set_layout(default_set: Path) -> None:
    manifest = json.loads((default_set / "dataset.json").read_text())
    assert manifest["params"]["classes"] == list(data.DEFAULT_CLASSES)
    for name in data.DEFAULT_CLASSES:
        cls = default_set / name
        assert len(list((cls / "train" / "good").glob("*.png"))) == 3
        assert len(list((cls / "test" / "good").glob("*.png"))) == 2
        for defect in data.DEFECT_TYPES:
            images = sorted((cls / "test" / defect).glob("*.png"))
            assert len(images) == 2
            for image in images:
                assert read(image).shape == (64, 64, 3)
                mask = read(cls / "ground_truth" / defect / f"{image.stem}_mask.png")
                assert mask.shape == (64, 64)
                assert set(np.unique(mask)) == {0, 255}


def test_default_set_masks_are_exact_and_crops_disjoint(default_set: Path) -> None:
    """With crop == size the files are the photo at the recorded box, except inside the mask."""
    manifest = json.loads((default_set / "dataset.json").read_text())
    for name in data.DEFAULT_CLASSES:
        photo = textures._photo(name)
        bands = manifest["bands"][name]
        train_stop, test_start = bands["train_rows"][1], bands["test_rows"][0]
        assert train_stop <= test_start  # disjoint row bands: no test pixel seen in training
        for rel, (y, x, h, w) in manifest["boxes"][name].items():
            if rel.startswith("train/"):
                assert y + h <= train_stop
            else:
                assert y >= test_start
            image = read(default_set / name / rel)
            original = photo[y:y + h, x:x + w]
            defect = rel.split("/")[1]
            if defect == "good":
                np.testing.assert_array_equal(image, original)
                continue
            mask = read(default_set / name / "ground_truth" / defect /
                        rel.split("/")[2].replace(".png", "_mask.png")) > 0
            np.testing.assert_array_equal(image[~mask], original[~mask])  # untouched outside
            changed = np.any(image != original, axis=-1)
            assert changed[mask].mean() > 0.5, (name, rel)  # written inside
            if defect == "foreign":
                source = manifest["foreign_sources"][name][rel]
                assert source["class"] != name
                sy, sx, sh, sw = source["box"]
                patch = textures._photo(source["class"])[sy:sy + sh, sx:sx + sw]
                np.testing.assert_array_equal(image[mask], patch[mask])


def test_default_set_is_deterministic_and_idempotent(default_set: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert data.make_default_dataset(again, seed=3, **SMALL) == list(data.DEFAULT_CLASSES)
    assert files_of(again) == files_of(default_set)
    stamp = (again / "dataset.json").stat().st_mtime_ns
    data.make_default_dataset(again, seed=3, **SMALL)  # same parameters: nothing rewritten
    assert (again / "dataset.json").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    data.make_default_dataset(other, seed=4, **SMALL)
    assert files_of(other) != files_of(default_set)
    with pytest.raises(data.DatasetError, match="made with other parameters"):
        data.make_default_dataset(again, seed=4, **SMALL)
    data.make_default_dataset(again, seed=4, overwrite=True, **SMALL)
    assert files_of(again) == files_of(other)
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_default_set_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the default data set tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    classes = data.make_default_dataset(tmp_path / "offline", seed=0, size=32, n_train=1,
                                        n_test_good=1, n_test_defect=1, classes=["gravel"])
    assert classes == ["gravel"]


def test_default_set_at_default_size_is_made_in_seconds(tmp_path: Path) -> None:
    start = time.perf_counter()
    classes = data.make_default_dataset(tmp_path / "full")
    elapsed = time.perf_counter() - start
    train = data.TrainDataset(tmp_path / "full", size=128, mean=MEAN, std=STD)
    assert len(train) == 80 * len(classes)
    assert elapsed < 30, f"default data set took {elapsed:.1f} s"


def test_default_set_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="classes must be distinct names among brick"):
        data.make_default_dataset(tmp_path / "x", classes=["marble"])
    with pytest.raises(data.DatasetError, match="crop 300 px is too large"):
        data.make_default_dataset(tmp_path / "x", size=64, crop=300)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a data set")
    with pytest.raises(data.DatasetError, match="is not a default data set made by snl"):
        data.make_default_dataset(tmp_path / "mine", **SMALL)


def test_train_and_test_datasets_on_default_set(default_set: Path) -> None:
    train = data.TrainDataset(default_set, "all", size=32, mean=MEAN, std=STD)
    assert len(train) == 3 * len(data.DEFAULT_CLASSES)
    assert train.classes == list(data.DEFAULT_CLASSES)
    x = train[0]
    assert x.shape == (3, 32, 32)
    assert x.dtype == torch.float32
    raw = np.asarray(Image.open(train.samples[0].path).convert("RGB").resize(
        (32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    expected = (torch.from_numpy(raw).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(x, expected)

    test = data.TestDataset(default_set, ["grass", "tissue"], size=64, mean=MEAN, std=STD)
    assert test.classes == ["grass", "tissue"]
    per_class = 2 + 2 * len(data.DEFECT_TYPES)
    assert len(test) == 2 * per_class
    assert test.labels().tolist() == [int(s.defect != "good") for s in test.samples]
    batch = next(iter(DataLoader(test, batch_size=len(test))))
    assert batch["image"].shape == (2 * per_class, 3, 64, 64)
    assert batch["mask"].shape == (2 * per_class, 1, 64, 64)
    good = batch["label"] == 0
    assert batch["mask"][good].sum() == 0
    assert (batch["mask"][~good].flatten(1).sum(1) > 0).all()
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert set(batch["class_name"]) == {"grass", "tissue"}
    item = test[int(np.flatnonzero(test.labels())[0])]
    mask_file = read(test.samples[int(np.flatnonzero(test.labels())[0])].mask_path) > 0
    np.testing.assert_array_equal(item["mask"][0].numpy() > 0, mask_file)

    one = data.TestDataset(default_set / "brick", size=64, mean=MEAN, std=STD)  # class folder
    assert one.classes == ["brick"]
    assert len(one) == per_class


def make_visa(root: Path) -> None:
    """A tiny VisA 1-class split: JPG images, masks named like the image, class-id values."""
    rng = np.random.default_rng(0)
    for sub in ("candle/train/good", "candle/test/good", "candle/test/bad",
                "candle/ground_truth/bad"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        pixels = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"candle/train/good/{i:03d}.JPG")
        Image.fromarray(pixels).save(root / f"candle/test/good/{i + 10:03d}.JPG")
        Image.fromarray(pixels).save(root / f"candle/test/bad/{i + 20:03d}.JPG")
        mask = np.zeros((80, 120), dtype=np.uint8)  # twice the image's size
        mask[20:40, 30:70] = 3  # VisA's raw masks hold class ids, not 255
        Image.fromarray(mask).save(root / f"candle/ground_truth/bad/{i + 20:03d}.png")


def test_visa_layout(tmp_path: Path) -> None:
    make_visa(tmp_path)
    assert data.list_classes(tmp_path) == ["candle"]
    train = data.TrainDataset(tmp_path, "candle", size=(20, 30), mean=MEAN, std=STD)
    assert len(train) == 2
    assert train[1].shape == (3, 20, 30)
    test = data.TestDataset(tmp_path, size=(20, 30), mean=MEAN, std=STD)
    assert [s.defect for s in test.samples] == ["bad", "bad", "good", "good"]
    item = test[0]
    assert item["label"] == 1
    assert item["class_name"] == "candle"
    expected = np.zeros((20, 30), dtype=np.float32)
    # [20:40, 30:70] of the 80x120 mask at a quarter of its size: columns 7 (mask columns
    # 28-31) and 17 (68-71) are half defect, and kept (>= 0.5).
    expected[5:10, 7:18] = 1
    np.testing.assert_array_equal(item["mask"][0].numpy(), expected)
    assert test[3]["mask"].sum() == 0
    assert test[3]["label"] == 0


def test_folder_errors_name_the_file(tmp_path: Path, default_set: Path) -> None:
    kw = {"size": 32, "mean": MEAN, "std": STD}
    with pytest.raises(data.DatasetError, match=r"data set root .*nowhere does not exist"):
        data.TrainDataset(tmp_path / "nowhere", **kw)
    with pytest.raises(data.DatasetError, match=r"unknown class 'marble' in .*; available: "
                                                r"brick, grass, gravel, tissue"):
        data.TestDataset(default_set, ["grass", "marble"], **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match=r"no class folders in .*empty"):
        data.TrainDataset(tmp_path / "empty", **kw)

    root = tmp_path / "mvtec"
    (root / "bottle/train/good").mkdir(parents=True)
    (root / "bottle/train/good/readme.txt").write_text("no images here")
    with pytest.raises(data.DatasetError, match=r"no images in .*bottle/train/good"):
        data.TrainDataset(root, **kw)
    (root / "bottle/test/broken_large").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "bottle/test/broken_large/000.png")
    with pytest.raises(data.DatasetError, match=r"missing mask for defect image .*broken_large/"
                       r"000\.png: looked for .*ground_truth/broken_large/000_mask\.png and "
                       r".*ground_truth/broken_large/000\.png"):
        data.TestDataset(root, **kw)
    (root / "bottle/test/broken_large/000.png").unlink()
    with pytest.raises(data.DatasetError, match=r"no images in .*bottle/test/<good\|defect>/"):
        data.TestDataset(root, **kw)
    (root / "bottle/train/good/001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    train = data.TrainDataset(root, "bottle", **kw)
    with pytest.raises(data.DatasetError, match=r"cannot read image .*train/good/001\.png"):
        train[0]
    with pytest.raises(data.DatasetError, match="cannot read image"):
        data.load_image(root / "bottle/train/good/readme.txt", 32, MEAN, STD)


def test_probes_are_deterministic_masked_and_cross_class(default_set: Path,
                                                          tmp_path: Path) -> None:
    classes = ["brick", "tissue"]
    out = data.make_probes(default_set, tmp_path / "p", classes, seed=5, size=64, count=3)
    manifest = json.loads((out / "probes.json").read_text())
    assert manifest["normal_images"]["brick"] == "test/good"  # never training images
    again = data.make_probes(default_set, tmp_path / "q", classes, seed=5, size=64, count=3)
    assert files_of(again) == files_of(out)
    other = data.make_probes(default_set, tmp_path / "r", classes, seed=6, size=64, count=3)
    assert files_of(other) != files_of(out)
    for name in classes:
        for kind in data.PROBE_KINDS:
            images = sorted((out / name / "test" / kind).glob("*.png"))
            assert len(images) == 3
            for image in images:
                rel = f"test/{kind}/{image.name}"
                source = manifest["sources"][name][rel]
                assert source["other_class"] != name
                assert source["base"].startswith(f"{name}/test/good/")
                assert source["other"].startswith(f"{source['other_class']}/test/good/")
                pixels = read(image).astype(np.int16)
                base = read(default_set / source["base"]).astype(np.int16)
                lender = read(default_set / source["other"]).astype(np.int16)
                mask = read(out / name / "ground_truth" / kind / image.name.replace(
                    ".png", "_mask.png")) > 0
                if kind == "mixup":
                    assert mask.all()
                    assert np.abs(pixels - (base + lender) / 2).max() <= 0.5
                else:
                    ty, tx, h, w = source["to_box"]
                    sy, sx, _, _ = source["from_box"]
                    expected = np.zeros_like(mask)
                    expected[ty:ty + h, tx:tx + w] = True
                    np.testing.assert_array_equal(mask, expected)
                    np.testing.assert_array_equal(pixels[~mask], base[~mask])
                    np.testing.assert_array_equal(pixels[mask],
                                                  lender[sy:sy + h, sx:sx + w].reshape(-1, 3))
                assert np.any(pixels != base)  # differs from the normal image it started from
    probe_set = data.TestDataset(out, "brick", size=64, mean=MEAN, std=STD)
    assert {s.defect for s in probe_set.samples} == set(data.PROBE_KINDS)
    assert probe_set[0]["mask"].sum() > 0


def test_probe_errors(default_set: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown probe 'blend'; known: mixup, cutpaste"):
        data.parse_kinds("mixup,blend")
    assert data.parse_kinds("") == []
    assert data.parse_kinds("cutpaste, mixup") == ["cutpaste", "mixup"]
    with pytest.raises(data.DatasetError, match="at least two classes"):
        data.make_probes(default_set / "brick", tmp_path / "p", seed=0, size=32, count=1)
    with pytest.raises(data.DatasetError, match="unknown class 'marble'"):
        data.make_probes(default_set, tmp_path / "p", ["marble"], size=32, count=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(data.DatasetError, match="is not a probe set made by snl"):
        data.make_probes(default_set, tmp_path / "mine", size=32, count=1)
