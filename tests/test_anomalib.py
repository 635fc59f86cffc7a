"""The anomalib 2.x adapter: fit, test, predict and ONNX export with anomalib's Engine.

A small folder data set is made in tmp_path: textured ``good`` crops of the embedded default
set (scikit-image's brick photograph) for training, and for testing four good crops and four
with a bright square (and its mask). The teacher is a random ResNet-18 (no weights offline)
at 64 x 64; one epoch of four steps. Skipped where anomalib or timm is not installed
(``pip install ".[anomalib]"``).
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import warnings

import pytest

pytest.importorskip("timm", reason='timm is not installed: pip install ".[model]"')
pytest.importorskip("anomalib", reason='anomalib is not installed: pip install ".[anomalib]"')

import numpy as np
import torch
from PIL import Image

from snl import metrics
from snl.data import make_default_dataset

with warnings.catch_warnings():  # anomalib's and timm's deprecation notices at import
    warnings.simplefilter("ignore", FutureWarning)
    from anomalib.data import Folder
    from anomalib.engine import Engine

    from snl.integrations.anomalib import SNL

pytestmark = [
    # Lightning's notes on what the tests do on purpose: the frozen teacher is in eval mode
    # at the start of training, and the losses are logged with logger=False.
    pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode"),
    pytest.mark.filterwarnings(r"ignore:You called `self.log\("),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # Lightning 2.6 on torch 2.14
    # Four steps on a random teacher make no detector: the self-check may say so.
    pytest.mark.filterwarnings("ignore:self-check. probe image AUROC"),
]

SIZE = 64  # the model's input (the files are 72 px: the pre-processor resizes)
N_TEST = 4  # good and defective test images each


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    """Tests choose backends themselves; an SNL_BACKEND left in the shell must not decide."""
    monkeypatch.delenv("SNL_BACKEND", raising=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``train/good`` (16), ``test/good`` (4), ``test/square`` (4) and their masks."""
    base = tmp_path_factory.mktemp("anomalib")
    made = base / "textures"
    make_default_dataset(made, seed=0, size=72, n_train=16, n_test_good=2 * N_TEST,
                         n_test_defect=1, classes=["brick"])
    root = base / "folder"
    shutil.copytree(made / "brick" / "train" / "good", root / "train" / "good")
    goods = sorted((made / "brick" / "test" / "good").glob("*.png"))
    (root / "test" / "good").mkdir(parents=True)
    (root / "test" / "square").mkdir(parents=True)
    (root / "ground_truth" / "square").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, path in enumerate(goods):
        if i < N_TEST:
            shutil.copy(path, root / "test" / "good" / path.name)
            continue
        image = np.asarray(Image.open(path).convert("RGB")).copy()
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        y, x = rng.integers(8, 72 - 8 - 20, 2)
        image[y:y + 20, x:x + 20] = 255  # a bright 20 x 20 square
        mask[y:y + 20, x:x + 20] = 255
        Image.fromarray(image).save(root / "test" / "square" / f"sq{i}.png")
        Image.fromarray(mask).save(root / "ground_truth" / "square" / f"sq{i}_mask.png")
    return root


def datamodule(root) -> Folder:
    return Folder(name="squares", root=root, normal_dir="train/good",
                  normal_test_dir="test/good", abnormal_dir="test/square",
                  mask_dir="ground_truth/square", train_batch_size=4, eval_batch_size=4,
                  num_workers=0, val_split_mode="same_as_test", seed=0)


def engine(tmp_path) -> Engine:
    return Engine(accelerator="cpu", devices=1, max_epochs=1, max_steps=4, logger=False,
                  default_root_dir=tmp_path, enable_progress_bar=False,
                  enable_model_summary=False)


def model(**kwargs) -> SNL:
    torch.manual_seed(0)
    kwargs.setdefault("visualizer", False)
    return SNL(backbone="resnet18", pretrained=False, image_size=SIZE, num_centers=4,
               **kwargs)


@pytest.fixture(scope="module")
def fitted(folder, tmp_path_factory):
    """An SNL model after Engine.fit, its engine and data module, and the teacher's state
    before the fit."""
    out = tmp_path_factory.mktemp("fit")
    snl_model = model()
    teacher_before = {k: v.clone() for k, v in snl_model.model.teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in snl_model.model.decoder.parameters()]
    eng, data = engine(out), datamodule(folder)
    eng.fit(snl_model, datamodule=data)
    return snl_model, eng, data, teacher_before, student_before, out


def _cat(predictions, field):
    return torch.cat([getattr(batch, field).flatten(1) if field in ("anomaly_map", "gt_mask")
                      else getattr(batch, field).flatten() for batch in predictions])


def test_fit_test_predict_match_snl_metrics(fitted, folder):
    snl_model, eng, data, teacher_before, student_before, out = fitted
    assert eng.trainer.global_step == 4
    # the student trained, the frozen teacher (BatchNorm statistics included) did not
    assert any(not torch.equal(a, b) for a, b in zip(
        student_before, snl_model.model.decoder.parameters(), strict=True))
    after = snl_model.model.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    snl_model.train()
    assert not any(m.training for m in snl_model.model.teacher.modules())
    assert snl_model.model.decoder.training

    results = eng.test(snl_model, datamodule=data, verbose=False)
    assert set(results[0]) >= {"image_AUROC", "pixel_AUROC"}
    predictions = eng.predict(snl_model, datamodule=data, return_predictions=True)
    scores, labels = _cat(predictions, "pred_score"), _cat(predictions, "gt_label")
    assert scores.shape == labels.shape == (2 * N_TEST,)
    assert int(labels.sum()) == N_TEST
    assert results[0]["image_AUROC"] == pytest.approx(metrics.auroc(scores, labels), abs=1e-5)
    maps, masks = _cat(predictions, "anomaly_map"), _cat(predictions, "gt_mask")
    assert maps.shape == masks.shape == (2 * N_TEST, SIZE * SIZE)
    assert results[0]["pixel_AUROC"] == pytest.approx(metrics.pixel_auroc(maps, masks),
                                                      abs=1e-5)
    assert not list(out.glob("**/images"))  # visualizer=False: no image files


def test_validation_logs_the_self_check(fitted, folder, tmp_path):
    assert 0.0 <= fitted[0].self_check <= 1.0  # the fit's validation epoch ran it
    # A student that reproduces its teacher ties every score: 0.5, and a warning says so.
    identity = model()
    forward = identity.model.forward

    def passthrough(images):
        features = forward(images)
        return features._replace(students=list(features.teachers))

    identity.model.forward = passthrough
    eng = engine(tmp_path)
    with pytest.warns(UserWarning, match=r"self-check: probe image AUROC 50\.0 < 77\.0"):
        eng.validate(identity, datamodule=datamodule(folder), verbose=False)
    normals, probes = (torch.cat(scores) for scores in identity._check_scores)
    assert len(normals) == len(probes) == N_TEST  # the good validation images and a probe each
    assert max(normals.abs().max(), probes.abs().max()) < 1e-5  # float32 rounding only
    assert identity.self_check == 0.5
    assert float(eng.trainer.callback_metrics["self_check"]) == 0.5


def test_checkpoint_reloads_without_fetching_weights(fitted, tmp_path):
    snl_model, *_, out = fitted
    state = torch.load(next(out.glob("**/model.ckpt")), weights_only=False)
    # as saved by a model with ImageNet weights or a local teacher file: neither is needed
    state["hyper_parameters"].update(pretrained=True, weights=str(tmp_path / "gone.pth"))
    torch.save(state, tmp_path / "model.ckpt")
    loaded = SNL.load_from_checkpoint(tmp_path / "model.ckpt")
    images = torch.rand(2, 3, 72, 72, generator=torch.Generator().manual_seed(1))
    expected, got = snl_model.eval()(images), loaded.eval()(images)
    for name in ("pred_score", "anomaly_map", "pred_label"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=0, rtol=0)


def test_export_onnx_runs_like_the_model(fitted, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    pytest.importorskip("onnx", reason="onnx not installed")
    pytest.importorskip("onnxscript", reason="anomalib 2.7 exports with torch.onnx's dynamo "
                        "exporter, which needs onnxscript")
    snl_model, eng, *_ = fitted
    path = eng.export(snl_model, "onnx", export_root=tmp_path)
    assert snl_model.model.fused  # switched to the reference ops for the export only
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    assert names == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    images = torch.rand(3, 3, 80, 96, generator=torch.Generator().manual_seed(0))
    outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    snl_model.eval()
    expected = snl_model(images)
    assert outputs["anomaly_map"].shape == (3, 1, SIZE, SIZE)
    for name in ("pred_score", "anomaly_map"):
        torch.testing.assert_close(torch.from_numpy(outputs[name]), getattr(expected, name),
                                   atol=1e-5, rtol=1e-4)


def test_rd_structure_trains_and_tests(folder, tmp_path):
    rd = model(structure="rd", visualizer=True)
    assert rd.model.structure == "rd"
    assert rd.model.cram is None
    eng, data = engine(tmp_path), datamodule(folder)
    eng.fit(rd, datamodule=data)
    results = eng.test(rd, datamodule=data, verbose=False)
    assert 0.0 <= results[0]["image_AUROC"] <= 1.0
    assert list(tmp_path.glob("**/images/**/*.png"))  # the default visualizer ran


def test_defaults_and_clear_errors(monkeypatch):
    pre = SNL.configure_pre_processor((64, 96), "tf_efficientnet_lite0")
    assert pre.transform(torch.zeros(1, 3, 10, 10)).shape[-2:] == (64, 96)
    normalize = pre.transform.transforms[1]
    assert list(normalize.mean) == [0.5, 0.5, 0.5]  # the backbone's, not ImageNet's
    for bad in ((100, 100), 48, (64,), (64, 0), "256", (64.0, 64.0), True):
        with pytest.raises(ValueError, match=r"image_size must be .*multiples of 32.*got "
                                             + re.escape(repr(bad))):
            SNL(backbone="resnet18", pretrained=False, image_size=bad)
    with pytest.raises(ValueError, match="structure must be one of"):
        SNL(backbone="resnet18", pretrained=False, image_size=64, structure="xx")

    monkeypatch.setitem(sys.modules, "anomalib", None)  # as if anomalib were not installed
    monkeypatch.delitem(sys.modules, "snl.integrations.anomalib")
    with pytest.raises(ImportError, match=r'pip install "snl-kernels\[anomalib\]"'):
        importlib.import_module("snl.integrations.anomalib")
