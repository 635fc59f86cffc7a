"""The command line's errors: one line ``snl: error: ...``, exit status 2 for bad usage and
1 for a failed run, the traceback only under --debug; data sets checked file by file before
the first epoch."""

from __future__ import annotations

import pytest
from PIL import Image
from support import assert_cli_error, require_model_extra

from snl import cli
from snl.data import DatasetError, check_dataset, make_default_dataset

require_model_extra()

TINY = {"size": 64, "n_train": 4, "n_test_good": 2, "n_test_defect": 1,
        "classes": ["brick", "grass"]}


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    make_default_dataset(root, seed=0, **TINY)
    return root


def test_bad_usage_is_one_line_with_status_2(capsys):
    for argv, match in ((["train", "--epochs", "x"], "argument --epochs: invalid int value"),
                        (["nosuch"], "invalid choice: 'nosuch'"),
                        (["train", "--w-c", "-1"], "a loss weight must be a finite number")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("snl: error: "), err
        assert match in err, err
        assert "\n" not in err, err
    assert_cli_error(capsys, ["compare", "--structures", "snl,xx"], 2,
                     r"--structures must name snl and/or rd, got 'snl,xx' \(see: snl compare")


def test_failed_runs_are_one_line_with_status_1(tmp_path, capsys):
    assert_cli_error(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--out",
                              str(tmp_path / "runs"), "--device", "cpu"], 1,
                     f"data set root {tmp_path / 'nowhere'} does not exist")
    assert_cli_error(capsys, ["eval", str(tmp_path / "none.pt")], 1,
                     f"checkpoint not found: {tmp_path / 'none.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_cli_error(capsys, ["predict", str(tmp_path / "junk.pt"), "x.png"], 1,
                     "cannot read checkpoint")


def test_debug_shows_the_traceback(tmp_path):
    for argv in (["--debug", "eval", str(tmp_path / "none.pt")],
                 ["eval", str(tmp_path / "none.pt"), "--debug"]):
        with pytest.raises(FileNotFoundError, match="checkpoint not found"):
            cli.main(argv)


def test_every_bad_file_is_listed_before_the_first_epoch(data, tmp_path, capsys):
    check_dataset(data)  # the made set is clean
    bad_train = data / "brick" / "train" / "good" / "001.png"
    bad_train.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    mask_gone = next((data / "grass" / "ground_truth" / "hole").glob("*.png"))
    mask_gone.unlink()
    small = next((data / "brick" / "ground_truth" / "scratch").glob("*.png"))
    Image.new("L", (10, 10)).save(small)
    with pytest.raises(DatasetError) as error:
        check_dataset(data)
    text = str(error.value)
    assert text.startswith(f"3 problem(s) in data set {data}:")
    assert f"{bad_train}: not a readable image" in text
    assert "missing mask for defect image" in text
    assert mask_gone.name in text
    assert f"{small}: mask is 10x10, its image" in text
    assert "is 64x64" in text
    with pytest.raises(DatasetError, match="1 problem"):  # brick's test side: the mask only
        check_dataset(data, "brick", train=False)
    out = tmp_path / "runs"
    err = assert_cli_error(capsys, ["train", "--data", str(data), "--backbone",
                                    "tf_efficientnet_lite0", "--no-pretrained", "--epochs", "1",
                                    "--image-size", "64", "--device", "cpu", "--out", str(out),
                                    "--name", "r"], 1, "3 problem")
    assert err.count("\n") == 3  # the headline and one line per file
    assert not (out / "r" / "checkpoints").exists()  # no epoch ran


def test_export_without_onnx_says_which_extra(data, tmp_path, capsys, monkeypatch):
    import torch

    run = tmp_path / "run"
    cli.train(cli.TrainConfig(data=str(data), backbone="tf_efficientnet_lite0", pretrained=False,
                              image_size=64, epochs=1, batch_size=4, device="cpu"), run,
              evaluate_after=False)

    def no_onnx(*args, **kwargs):
        raise ModuleNotFoundError("Module onnx is not installed!")

    monkeypatch.setattr(torch.onnx, "export", no_onnx)
    assert_cli_error(capsys, ["export", str(run / "checkpoints" / "last.pt"), "--onnx",
                              str(tmp_path / "m.onnx")], 1,
                     r"Module onnx is not installed! \(the export needs the export extra: "
                     r"pip install 'snl-kernels\[export\]'\)")
