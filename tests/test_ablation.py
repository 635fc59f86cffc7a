"""scripts/ablation.py: every row is a valid training configuration, each row runs as one
``snl compare`` with its options, and the table reads the runs' results."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from support import require_model_extra

require_model_extra()

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_builds_a_model_with_its_options(ablation):
    import snl
    from snl import distributed
    from snl.cli import TrainConfig, build_model

    world = distributed.setup("cpu")
    names = {ablation.folder_name(row) for row in ablation.ROWS}
    assert len(names) == len(ablation.ROWS)  # one folder per row
    for row, (structure, options) in ablation.ROWS.items():
        config = dataclasses.replace(TrainConfig(backbone="tf_efficientnet_lite0",
                                                 pretrained=False), structure=structure,
                                     **options)
        model = build_model(config, world)
        assert isinstance(model, snl.SNL), row
        assert model.structure == structure, row
        if structure == "snl":
            w = model.loss_weights
            for name in ("w_ch", "w_sp", "w_intra", "w_inter", "w_c", "w_rd"):
                assert getattr(w, name) == getattr(config, name), (row, name)
            assert model.compact_norm == config.compact_norm
    default = ablation.ROWS["default: structural terms 0.01, compactness 0.1"][1]
    assert dataclasses.replace(TrainConfig(), **default) == TrainConfig()  # it is the default
    from snl.cli.training import V1_FORMULATION

    v1 = ablation.ROWS["v1: structural terms 1, compactness 0.1 (sum over D)"][1]
    assert v1 == V1_FORMULATION


def _result(seed, image, aupro, mixup):
    by_type = {c: {"mixup": {"image_auroc": mixup}, "foreign": {"image_auroc": 0.5},
                   "cutpaste": {"image_auroc": 0.5}} for c in ("a", "b")}
    return {"seed": seed, "table": {"mean": {"image_auroc": image, "aupro": aupro,
                                             "pixel_auroc": 0.9}},
            "by_type": by_type}


def test_runs_one_compare_per_row_and_tables_the_results(ablation, tmp_path, monkeypatch):
    import snl.compare

    calls = []

    def fake_compare(out_dir, config, seeds, structures):
        calls.append((Path(out_dir), config, list(seeds), list(structures)))
        for seed, (image, aupro) in zip(seeds, ((0.8, 0.6), (0.9, 0.7)), strict=False):
            run = Path(out_dir) / "runs" / f"{structures[0]}-seed{seed}"
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps(_result(seed, image, aupro, 0.75)))

    monkeypatch.setattr(snl.compare, "compare", fake_compare)
    rows = ["RD4AD baseline (structure rd)", "default, residual ratio 4"]
    monkeypatch.setattr(sys, "argv", ["ablation.py", "--out", str(tmp_path), "--seeds", "0,1",
                                      "--rows", ";".join(rows)])
    ablation.main()
    assert [c[3] for c in calls] == [["rd"], ["snl"]]
    assert all(c[2] == [0, 1] and c[1].data_seed == 0 for c in calls)
    assert calls[1][1].residual_ratio == 4
    assert calls[1][1].w_rd == 1.0
    text = (tmp_path / "ablation.md").read_text()
    assert "| RD4AD baseline (structure rd) | 0,1 | 85.0 ± 7.1 | 65.0 ± 7.1 | 90.0 ± 0.0 | " \
           "50.0 ± 0.0 | 50.0 ± 0.0 | 75.0 ± 0.0 |" in text
    assert text.count("\n") == 4  # header, rule, two rows
    monkeypatch.setattr(sys, "argv", ["ablation.py", "--rows", "no such row"])
    with pytest.raises(SystemExit, match="unknown rows"):
        ablation.main()


def test_cram_assignment_statistics_follow_the_temperature():
    """scripts/cram_assignments.py: the same model started at tau = D assigns more softly
    than at tau = sqrt(D) (a softmax's entropy grows with its temperature), within the
    bounds of an assignment."""
    import math

    import torch

    import snl

    spec = importlib.util.spec_from_file_location(
        "cram_assignments_script", SCRIPT.parent / "cram_assignments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    stats = {}
    for tau in ("dim", "sqrt"):
        torch.manual_seed(0)
        model = snl.SNL("resnet18", pretrained=False, num_centers=4, cram_tau=tau).eval()
        stats[tau] = module.assignment_stats(model, images)
        s = stats[tau]
        assert 0.0 <= s["entropy"] <= s["uniform_entropy"] == pytest.approx(math.log(4))
        assert 0.25 <= s["top_weight"] <= 1.0
        assert s["dist_mean"] > 0
        assert s["dist_std_over_centres"] > 0
    assert stats["dim"]["tau"] == pytest.approx(512.0)  # resnet18: D = 2 x 256
    assert stats["sqrt"]["tau"] == pytest.approx(math.sqrt(512.0))
    assert stats["dim"]["entropy"] > stats["sqrt"]["entropy"]
    with pytest.raises(ValueError, match="has no CRAM"):
        module.assignment_stats(snl.SNL("resnet18", pretrained=False, structure="rd"), images)
