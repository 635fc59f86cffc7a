"""snl compare: both structures and every seed trained on the same data, tables with the
spread computed from the per-seed numbers, probes as types, finished runs kept on a rerun."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from support import assert_cli_error, require_model_extra
from test_html_report import assert_renders, assert_self_contained

from snl import cli, compare
from snl.data import DEFECT_TYPES, PROBE_KINDS, make_default_dataset

require_model_extra()

TINY = {"size": 64, "n_train": 4, "n_test_good": 3, "n_test_defect": 2,
        "classes": ["brick", "grass"]}


def test_compare_tables_seeds_spread_and_rerun(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    make_default_dataset(data, seed=0, **TINY)
    argv = ["compare", "--data", str(data), "--seeds", "0,1", "--backbone",
            "tf_efficientnet_lite0", "--image-size", "64", "--epochs", "1", "--batch-size", "4",
            "--num-centers", "4", "--device", "cpu", "--probe-count", "2",
            "--out", str(tmp_path / "out"), "--name", "c"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # Seed by seed, the structures in turn, so that a drifting machine slows both alike.
    order = [(k, structure, seed) for k, (seed, structure) in enumerate(
        [(0, "snl"), (0, "rd"), (1, "snl"), (1, "rd")], 1)]
    positions = [printed.index(f"compare: run {k}/4: {structure}, seed {seed} ")
                 for k, structure, seed in order]
    assert positions == sorted(positions)
    folder = tmp_path / "out" / "c"
    result = json.loads((folder / "compare.json").read_text())
    assert result["runs_finished"] == 4
    assert set(result["runs"]) == {"snl", "rd"}
    assert all(set(result["runs"][s]) == {"0", "1"} for s in ("snl", "rd"))
    types = {"all", *DEFECT_TYPES, *PROBE_KINDS}
    for structure in ("snl", "rd"):
        for name in ("brick", "grass", "mean"):
            assert set(result["summary"][structure][name]) == types
    # The two seeds trained different models on the same data.
    per_seed = [result["runs"]["snl"][s]["table"]["mean"]["image_auroc"] for s in ("0", "1")]
    assert per_seed[0] != per_seed[1]
    # Mean and spread come from the per-seed numbers.
    raw = [result["runs"]["rd"][s]["by_type"]["grass"]["mixup"]["aupro"] for s in ("0", "1")]
    stats = result["summary"]["rd"]["grass"]["mixup"]["aupro"]
    assert stats["mean"] == pytest.approx(np.mean(raw))
    assert stats["std"] == pytest.approx(np.std(raw, ddof=1))
    assert (stats["min"], stats["max"], stats["n"]) == (min(raw), max(raw), 2)
    table = (folder / "compare.md").read_text()
    assert "Runs finished: 4/4" in table
    seconds = {s: [result["runs"][s][seed]["train_seconds"] for seed in ("0", "1")]
               for s in ("snl", "rd")}
    ratio = np.median(seconds["snl"]) / np.median(seconds["rd"])
    assert f"SNL over RD: {ratio:.2f}." in table
    assert f"| {np.median(seconds['rd']):.0f} |" in table.split("## ")[1]
    cell = f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
    assert any(line.startswith("| grass | mixup | ") and cell in line
               for line in table.split("## AUPRO@0.3")[1].splitlines())
    assert "| **mean** | cutpaste | " in table
    # The self-check beside the true metrics: each run's figures and flags, the tables' column,
    # and its own section with the rank correlation over every (run, class).
    pairs = []
    for structure in ("snl", "rd"):
        for seed in ("0", "1"):
            run = result["runs"][structure][seed]
            check = run["self_check"]
            assert check["flag_below"] == 0.77
            for name in ("brick", "grass"):
                figure = check["classes"][name]["image_auroc"]
                assert run["table"][name]["self_check"] == figure
                assert check["classes"][name]["flagged"] == (figure < 0.77)
                assert (name in check["flagged"]) == (figure < 0.77)
                pairs.append((figure, run["table"][name]["image_auroc"]))
    assert result["summary"]["snl"]["mean"]["all"]["self_check"]["n"] == 2
    rho = spearmanr(*zip(*pairs, strict=True)).statistic
    assert f"all {rho:.3f} (n = 8)" in table
    assert "## Self-check beside image AUROC" in table
    assert "## self-check per class" not in table  # no per-type table: it has no type
    stats = result["summary"]["rd"]["grass"]["all"]["self_check"]
    assert f"| grass | rd | {100 * stats['mean']:.1f} ± {100 * stats['std']:.1f} | " in table
    # report.html: the same tables, both structures' curves, links to every run's report.
    page = folder / "report.html"
    images = assert_self_contained(page, links_allowed=True)
    text = page.read_text()
    assert "<td>grass</td><td>mixup</td>" in text
    assert cell in text
    assert "snl − rd" in text
    assert "PRO curves" in text
    assert ">Self-check beside image AUROC</h2>" in text
    assert len(images) == 2
    for structure in ("snl", "rd"):
        for seed in (0, 1):
            link = f"runs/{structure}-seed{seed}/report.html"
            assert f'href="{link}"' in text
            assert (folder / link).is_file()
    assert_renders(page, len(images))

    # A rerun into the same folder keeps finished runs; one whose result was lost (a crash
    # after training) is evaluated again from its checkpoint, to the same numbers.
    lost = folder / "runs" / "snl-seed1" / "result.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    trained = []
    real_train = cli.training.train

    def counting_train(config, run_dir, resume=False, **kw):
        trained.append((run_dir.name, resume))
        return real_train(config, run_dir, resume=resume, **kw)

    monkeypatch.setattr(compare, "train", counting_train)
    assert cli.main(argv) == 0
    assert trained == [("snl-seed1", True)]
    assert json.loads(lost.read_text())["table"] == before["table"]
    assert json.loads((folder / "compare.json").read_text())["summary"] == result["summary"]
    assert_cli_error(capsys, [*argv, "--lr", "0.001"], 1,
                     "holds a comparison with other settings")
    # A folder written before an option existed (here cram_tau) resumes: its runs had the
    # behaviour the option's default keeps.
    settings = folder / "settings.json"
    saved = json.loads(settings.read_text())
    del saved["cram_tau"]
    settings.write_text(json.dumps(saved))
    trained.clear()
    assert cli.main(argv) == 0
    assert trained == []
    # One written before the self-check existed trained on every image: its runs differ.
    saved = json.loads(settings.read_text())
    del saved["self_check"], saved["holdout"]
    settings.write_text(json.dumps(saved))
    assert_cli_error(capsys, argv, 1, "self_check: False there, True now")
    assert_cli_error(capsys, [*argv[:3], "--seeds", "1,1"], 2,
                     "--seeds must name distinct integers")
