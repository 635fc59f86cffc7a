"""The command line's errors: one line ``snl: error: ...``, exit status 2 for bad usage and
1 for a failed run, the traceback only under --debug; data sets checked file by file before
the first epoch."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch run on a tiny set: its checkpoint for eval, predict and export."""
    root = tmp_path_factory.mktemp("cli-errors")
    make_default_dataset(root / "data", seed=0, **TINY)
    cli.train(cli.TrainConfig(data=str(root / "data"), backbone="tf_efficientnet_lite0",
                              pretrained=False, image_size=64, epochs=1, batch_size=4,
                              device="cpu"), root / "run", evaluate_after=False)
    return root / "run"


def _snl(*argv: str, env: dict | None = None, block_onnx: bool = False):
    """``snl ARGV`` in a fresh interpreter (what a user's shell runs), with ``onnx`` made
    unimportable if ``block_onnx``."""
    code = ("import sys; sys.modules['onnx'] = None; " if block_onnx else "import sys; ")
    code += "from snl.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _one_line(err: str, match: str) -> None:
    err = err.strip()
    assert err.startswith("snl: error: "), err
    assert "\n" not in err, err
    assert re.search(match, err), err


def test_every_commands_common_mistakes_are_one_line(run, tmp_path, capsys):
    """Each command's common mistakes: a missing file or folder, a bad option, a missing
    extra; exactly one line on stderr, starting ``snl: error:``."""
    ckpt = str(run / "checkpoints" / "last.pt")
    missing = str(tmp_path / "missing.pt")
    usage = [  # argparse's own errors: exit status 2
        (["train", "--epochs", "x"], "argument --epochs: invalid int value"),
        (["train", "--structure", "both"], "argument --structure: invalid choice"),
        (["eval", ckpt, "--threshold", "best"], "argument --threshold"),
        (["compare", "--seeds"], "argument --seeds: expected one argument"),
        (["predict", ckpt], "the following arguments are required: images"),
        (["export", ckpt], "the following arguments are required: --onnx"),
        (["info", "--verbose"], "unrecognized arguments: --verbose"),
    ]
    for argv, match in usage:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2, argv
        _one_line(capsys.readouterr().err, match)
    failed = [  # (argv, exit status, message)
        (["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs"),
          "--device", "cpu"], 1, "does not exist"),
        (["train", "--resume", str(tmp_path / "norun"), "--device", "cpu"], 1, "norun"),
        (["eval", missing], 1, "checkpoint not found"),
        (["eval", ckpt, "--data", str(tmp_path / "nowhere"), "--device", "cpu"], 1,
         "nowhere"),
        (["eval", ckpt, "--probes", "blend"], 2, "--probes 'blend'"),
        (["compare", "--structures", "snl,xx"], 2, "--structures must name snl and/or rd"),
        (["compare", "--seeds", "a,b"], 2, "--seeds"),
        (["predict", missing, "x.png"], 1, "checkpoint not found"),
        (["predict", ckpt, str(tmp_path / "none.png"), "--out", str(tmp_path / "p"),
          "--device", "cpu"], 1, "not an image file"),
        (["export", missing, "--onnx", str(tmp_path / "m.onnx")], 1, "checkpoint not found"),
        (["export", ckpt, "--onnx", str(tmp_path)], 1, "is a folder"),
        (["export", ckpt, "--onnx", str(tmp_path / "no" / "m.onnx")], 1,
         "does not exist"),
    ]
    for argv, status, match in failed:
        if argv[0] == "export" and importlib.util.find_spec("onnx") is None:
            match = "needs the onnx package"  # the extra is checked first
        capsys.readouterr()
        assert cli.main(argv) == status, argv
        _one_line(capsys.readouterr().err, match)


def test_export_without_onnx_says_which_extra_before_tracing(run, tmp_path):
    out = tmp_path / "m.onnx"
    result = _snl("export", str(run / "checkpoints" / "last.pt"), "--onnx", str(out),
                  block_onnx=True)
    assert result.returncode == 1
    _one_line(result.stderr, re.escape(
        'snl: error: snl export needs the onnx package, which is not installed: '
        'pip install "snl-kernels[export]"'))
    assert result.stdout == ""
    assert not out.exists()


def test_export_prints_the_file_and_nothing_else(run, tmp_path):
    pytest.importorskip("onnx", reason="onnx (the export extra) is not installed")
    out = tmp_path / "m.onnx"
    result = _snl("export", str(run / "checkpoints" / "last.pt"), "--onnx", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert result.stderr == ""  # no TracerWarning flood
    assert out.stat().st_size > 0
