"""scripts/selfcheck_study.py: probes built on held-out or test/good bases with lenders of
either kind, and both studies run end to end on a tiny set (two classes at 64 px, 2 epochs)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from support import require_model_extra

from snl.data import make_default_dataset
from snl.data.holdout import PROBES_PER_IMAGE

require_model_extra()

SET = {"size": 64, "n_train": 24, "n_test_good": 2, "n_test_defect": 1,
       "classes": ["brick", "gravel"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "textures"
    make_default_dataset(root, seed=0, **SET)
    return root


@pytest.fixture(scope="module")
def study():
    path = Path(__file__).resolve().parents[1] / "scripts" / "selfcheck_study.py"
    spec = importlib.util.spec_from_file_location("selfcheck_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probes_take_bases_and_lenders_from_the_named_images(data, study):
    images = study.pools(data, 64)
    assert [len(images[k]["brick"]) for k in "HTR"] == [8, 2, 8]  # 8 held out; 2 test/good
    np.testing.assert_array_equal(images["R"]["brick"][3], images["H"]["brick"][3][::-1, ::-1])
    for kind in study.KINDS:
        x, n = study.probe_images(images, kind, "brick")
        bases = np.stack(images[kind[0]]["brick"])
        assert n == len(bases)
        assert len(x) == n * (1 + PROBES_PER_IMAGE)
        np.testing.assert_array_equal(x[:n], bases)
        lenders = np.stack(images[kind[1]]["gravel"])  # the only other class
        for i, probe in enumerate(x[n:]):
            ys, xs = np.nonzero(np.any(probe != bases[i % n], axis=-1))
            assert len(ys), "a probe equal to its base"
            patch = probe[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            windows = sliding_window_view(lenders, patch.shape, axis=(1, 2, 3))
            assert (windows == patch).all(axis=(-3, -2, -1)).any(), (kind, i)


def test_epochs_then_bases_end_to_end(data, study, tmp_path, capsys):
    with pytest.raises(SystemExit, match="'lr' is not FIELD=VALUE"):
        study.main(["epochs", str(tmp_path), "--seeds", "0", "--set", "lr"])
    small = ["image_size=64", "epochs=2", "batch_size=8", "num_centers=4", "device=cpu"]
    assert study.main(["epochs", str(tmp_path / "e"), "--seeds", "0", "--data", str(data),
                       "--set", *small]) == 0
    epochs = json.loads((tmp_path / "e" / "epochs.json").read_text())
    assert list(epochs) == ["0"]
    assert list(epochs["0"]) == ["2"]
    row = epochs["0"]["2"]
    assert sorted(row) == ["brick", "gravel"]
    assert all(0 <= row[c][k] <= 1 for c in row for k in ("real", "H", "T"))
    printed = capsys.readouterr().out
    assert "brick: Spearman over seeds x epochs" in printed
    assert "keeping the epoch of the best T figure of the last three" in printed

    run = tmp_path / "cmp" / "runs" / "snl-seed0"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "e" / "seed0" / "checkpoints" / "last.pt", run / "checkpoints")
    table = {c: {"image_auroc": row[c]["real"]} for c in row}
    (run / "result.json").write_text(json.dumps({"structure": "snl", "seed": 0,
                                                 "table": table}))
    assert study.main(["bases", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "2 class-runs, 0 broken" in printed
    for kind in study.KINDS:
        assert f"base {kind[0]}, lender {kind[1]}: Spearman" in printed
    # the last epoch's T figure of the epochs study is the bases study's TT figure
    tt = float(printed.split("brick: real")[1].split("TT ")[1].split()[0].rstrip(","))
    assert tt == pytest.approx(100 * row["brick"]["T"], abs=0.051)
    assert study.main(["bases", str(tmp_path / "nothing")]) == 1
