"""The self-check: held-out training images, their cut-paste probes, the flag it raises on a
student that reproduces the teacher (and not on a trained one), ``--restarts``, the flags.

The trained model is the smallest that learns its classes: two classes of the embedded
default set at 64 px, 16 training images each (8 more held out), 6 epochs of batch 8 on the
offline Lite0 teacher. The classes are brick and gravel, whose textures differ, so that a
pasted patch is an anomaly one can see, as between the default set's four classes (grass
and gravel look alike at 64 px: a patch of one in the other is no anomaly to anybody).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from support import assert_cli_error, require_model_extra

from snl import cli, selfcheck
from snl.cli import arguments, training
from snl.data import TrainDataset, make_default_dataset, make_holdout_probes, split_holdout
from snl.data.holdout import PROBES_PER_IMAGE, holdout_count

require_model_extra()

SET = {"size": 64, "n_train": 24, "n_test_good": 2, "n_test_defect": 1,
       "classes": ["brick", "gravel"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("selfcheck") / "textures"
    make_default_dataset(root, seed=0, **SET)
    return root


def _config(data, **kw):
    base = {"data": str(data), "backbone": "tf_efficientnet_lite0", "image_size": 64,
            "epochs": 6, "batch_size": 8, "device": "cpu", "num_centers": 4}
    return cli.TrainConfig(**{**base, **kw})


def _identity(model):
    """Make ``model``'s student reproduce the teacher exactly: its features are the
    teacher's passed through (plus 0 x its own, so that training still has a gradient)."""
    forward = model.forward

    def passthrough(images):
        features = forward(images)
        return features._replace(students=[t + 0 * s for t, s in
                                           zip(features.teachers, features.students,
                                               strict=True)])

    model.forward = passthrough
    return model


def test_holdout_rule():
    assert [holdout_count(n) for n in (80, 100, 200, 6, 1, 0)] == [8, 10, 20, 3, 0, 0]
    assert holdout_count(80, minimum=12) == 12
    with pytest.raises(ValueError, match="minimum=0"):
        holdout_count(80, minimum=0)


def test_split_is_fixed_and_training_leaves_it_out(data):
    held = split_holdout(data, "all")
    assert held == split_holdout(data, ["gravel", "brick"])  # per class, whatever the order
    assert held.counts == {"brick": 24, "gravel": 24}
    files = {name: sorted((data / name / "train" / "good").glob("*.png")) for name in held.held}
    for name, paths in held.held.items():
        assert len(paths) == 8
        assert paths == sorted(paths)
        assert set(paths) <= set(files[name])
    assert split_holdout(data, "all", seed=1) != held  # the seed decides, not the file order
    dataset = TrainDataset(data, "all", size=64, mean=(0, 0, 0), std=(1, 1, 1),
                           exclude=held.excluded())
    trained = {s.path for s in dataset.samples}
    assert len(trained) == 32
    assert not trained & held.excluded()
    assert trained | held.excluded() == set(files["brick"]) | set(files["gravel"])


def _pixels(path):
    with Image.open(path) as image:  # the set is written at 64 px: no resize
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def _check_probe(probe, mask, base, lender, source):
    y, x, h, w = source["to_box"]
    sy, sx, sh, sw = source["from_box"]
    assert (sh, sw) == (h, w)
    expected = np.zeros(mask.shape, dtype=bool)
    expected[y:y + h, x:x + w] = True
    assert np.array_equal(mask, expected)
    assert np.array_equal(probe[~mask], base[~mask])
    assert np.array_equal(probe[y:y + h, x:x + w], lender[sy:sy + h, sx:sx + w])


def test_probes_paste_another_class_or_another_place(data):
    held = split_holdout(data, "all")
    sets = make_holdout_probes(held, 64, root=data)
    again = make_holdout_probes(held, 64, root=data)
    for name, probe_set in sets.items():
        assert probe_set.normals.shape == (8, 64, 64, 3)
        assert probe_set.probes.shape == (8 * PROBES_PER_IMAGE, 64, 64, 3)
        assert np.array_equal(probe_set.probes, again[name].probes)  # deterministic
        other = "gravel" if name == "brick" else "brick"
        lenders = [str(p.relative_to(data)) for p in held.held[other]]
        for i, source in enumerate(probe_set.sources):
            assert source["other_class"] == other  # multi-class: another class's patch
            assert source["other"] in lenders  # and a held-out one
            assert source["base"] == str(held.held[name][i % 8].relative_to(data))
            _check_probe(probe_set.probes[i], probe_set.masks[i], probe_set.normals[i % 8],
                         _pixels(data / source["other"]), source)
    # One class: another held-out image of the class, pasted at another place.
    one = split_holdout(data, "brick")
    probe_set = make_holdout_probes(one, 64, root=data)["brick"]
    for i, source in enumerate(probe_set.sources):
        assert source["other_class"] == "brick"
        assert source["other"] != source["base"]
        assert source["to_box"] != source["from_box"]
        j = [str(p.relative_to(data)) for p in one.held["brick"]].index(source["other"])
        _check_probe(probe_set.probes[i], probe_set.masks[i], probe_set.normals[i % 8],
                     probe_set.normals[j], source)


def test_batch_probes_paste_another_image_elsewhere():
    """The anomalib adapter's probes: one per image, a rectangle of another image of the
    batch (of the image itself, elsewhere, in a batch of one)."""
    images = torch.arange(3 * 3 * 40 * 48, dtype=torch.float32).reshape(3, 3, 40, 48)
    probes, masks = selfcheck.cutpaste_batch(images, seed=1)
    again, _ = selfcheck.cutpaste_batch(images, seed=1)
    assert torch.equal(probes, again)
    assert not torch.equal(probes, selfcheck.cutpaste_batch(images, seed=2)[0])
    for i in range(3):
        rows, cols = masks[i].any(1).nonzero().flatten(), masks[i].any(0).nonzero().flatten()
        assert int(masks[i].sum()) == len(rows) * len(cols)  # a rectangle
        assert 0.15 * 40 - 1 <= len(rows) <= 0.35 * 40 + 1
        assert torch.equal(probes[i][:, ~masks[i]], images[i][:, ~masks[i]])
        patch = probes[i][:, masks[i]]
        # every value of these images is distinct: the patch came from one other image
        assert not torch.isin(patch, images[i]).any()
        assert sum(bool(torch.isin(patch, images[j]).all()) for j in range(3) if j != i) == 1
    single, mask = selfcheck.cutpaste_batch(images[:1])
    assert not torch.equal(single[0][:, mask[0]], images[0][:, mask[0]])  # moved elsewhere
    assert torch.isin(single[0], images[0]).all()
    assert selfcheck.probe_auroc(np.zeros(3), np.full(3, 1e-7)) == 0.5  # rounding: ties
    assert selfcheck.probe_auroc(np.zeros(3), np.full(3, 1e-3)) == 1.0


def test_trained_student_passes_and_identity_student_is_flagged(data, tmp_path, capsys,
                                                                monkeypatch):
    model = cli.train(_config(data), tmp_path / "run")
    printed = capsys.readouterr().out
    assert "self-check: held out of training (per class): brick 8 of 24, gravel 8 of 24" \
        in printed
    assert "on 32 images of brick, gravel" in printed
    assert "WARNING" not in printed
    run = tmp_path / "run"
    check = json.loads((run / "self_check.json").read_text())
    assert check["flagged"] == []
    assert check["flag_below"] == selfcheck.FLAG_BELOW
    assert check["held_out"] == {name: [str(p.relative_to(data)) for p in paths]
                                 for name, paths in split_holdout(data).held.items()}
    table = json.loads((run / "metrics.json").read_text())
    for name in ("brick", "gravel"):
        figure = check["classes"][name]["image_auroc"]
        assert figure >= selfcheck.FLAG_BELOW
        assert table[name]["self_check"] == figure
        assert f"| {name} | 8 | 32 | {100 * figure:.1f} |" in (run / "report.md").read_text()
    assert table["mean"]["self_check"] == pytest.approx(
        np.mean([table[n]["self_check"] for n in ("brick", "gravel")]))
    assert "| self-check |" in printed  # the console summary's column
    assert ">Self-check</h2>" in (run / "report.html").read_text()
    # The embedded set's held-out crops overlap trained ones; the run and its reports say so.
    shared = check["shared_pixels"]
    assert shared == selfcheck.shared_pixels(split_holdout(data), data)
    assert sorted(shared) == ["brick", "gravel"]
    assert 0 < sum(shared.values()) <= 16
    note = (f"Note: {sum(shared.values())} of the 16 held-out images share pixels with trained "
            "ones")
    assert note in printed
    assert note in (run / "report.md").read_text()

    # The same model, its student made to reproduce the teacher: every score ties.
    identity = selfcheck.run(_identity(model), split_holdout(data), 64, "cpu", root=data)
    assert identity["flagged"] == ["brick", "gravel"]
    assert all(row["image_auroc"] == 0.5 for row in identity["classes"].values())

    # Trained that way from the start, a run says so: one line per class, with its figure.
    real_build = training.build_model
    monkeypatch.setattr(training, "build_model", lambda *a: _identity(real_build(*a)))
    cli.train(_config(data, epochs=1), tmp_path / "identity")
    lines = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert lines == [f"self-check: WARNING: class {name} flagged: probe image AUROC 50.0 < 77.0 "
                     "(the student may reproduce anomalies instead of flagging them); retrain "
                     "with another --seed, or with --restarts N" for name in ("brick", "gravel")]
    table = json.loads((tmp_path / "identity" / "metrics.json").read_text())
    assert table["brick"]["self_check"] == table["gravel"]["self_check"] == 0.5
    assert "FLAGGED" in (tmp_path / "identity" / "report.md").read_text()
    assert "class gravel flagged" in (tmp_path / "identity" / "report.html").read_text()


def test_restarts_keep_the_run_the_self_check_prefers(data, tmp_path, capsys, monkeypatch):
    """Scripted figures (the training is real, one epoch): seed 0 flags one class, seed 1
    two, seed 2 one but higher: all three are trained, seed 2 is kept."""
    scripted = [{"brick": 0.70, "gravel": 0.90}, {"brick": 0.60, "gravel": 0.65},
                {"brick": 0.95, "gravel": 0.74}]
    real_run = selfcheck.run

    def scripted_run(*args, **kw):
        check = real_run(*args, **kw)
        figures = scripted.pop(0)
        for name, row in check["classes"].items():
            row["image_auroc"] = figures[name]
            row["flagged"] = figures[name] < selfcheck.FLAG_BELOW
        check["flagged"] = [n for n, row in check["classes"].items() if row["flagged"]]
        return check

    monkeypatch.setattr(selfcheck, "run", scripted_run)
    run = tmp_path / "runs" / "r"
    assert cli.main(["train", "--data", str(data), "--backbone", "tf_efficientnet_lite0",
                     "--image-size", "64", "--epochs", "1", "--batch-size", "8",
                     "--num-centers", "4", "--device", "cpu", "--seed", "0", "--restarts", "3",
                     "--out", str(run.parent), "--name", "r"]) == 0
    printed = capsys.readouterr().out
    assert "restarts: seed 0 flagged (brick 70.0); trying seed 1" in printed
    assert ("restarts: kept seed 2 of 3 run(s): every seed was flagged (seed 0: brick 70.0; "
            "seed 1: brick 60.0, gravel 65.0; seed 2: gravel 74.0); seed 2 has the fewest "
            "flagged classes (1), then the highest lowest figure (gravel 74.0)") in printed
    assert "s more than one run (3 run(s), " in printed
    record = json.loads((run / "restarts.json").read_text())
    assert record["kept_seed"] == 2
    assert [r["folder"] for r in record["runs"]] == ["restarts/seed0", "restarts/seed1", "."]
    assert record["extra_seconds"] == pytest.approx(
        record["total_seconds"] - record["runs"][0]["seconds"])
    assert json.loads((run / "config.json").read_text())["seed"] == 2
    assert json.loads((run / "metrics.json").read_text())["gravel"]["self_check"] == 0.74
    assert sorted(p.name for p in (run / "restarts").iterdir()) == ["seed0", "seed1"]
    assert (run / "restarts" / "seed1" / "checkpoints" / "last.pt").is_file()
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert kept["config"]["seed"] == 2
    assert kept["calibration"] is not None

    # A clean first seed needs no restart.
    scripted[:] = [{"brick": 0.9, "gravel": 0.9}]
    assert cli.main(["train", "--data", str(data), "--backbone", "tf_efficientnet_lite0",
                     "--image-size", "64", "--epochs", "1", "--batch-size", "8",
                     "--num-centers", "4", "--device", "cpu", "--restarts", "3",
                     "--out", str(run.parent), "--name", "clean"]) == 0
    printed = capsys.readouterr().out
    assert "restarts: kept seed 0 of 1 run(s): the self-check flags none of its classes " \
           "(lowest brick 90.0)" in printed
    assert "restarts: no restart needed, no extra time" in printed
    assert not scripted


def test_flags(data, tmp_path, capsys):
    parse = arguments.build_parser("snl").parse_args
    config = arguments.train_config(parse(["train"]))
    assert (config.self_check, config.holdout) == (True, 8)
    config = arguments.train_config(parse(["train", "--no-self-check", "--holdout", "12"]))
    assert (config.self_check, config.holdout) == (False, 12)
    config = arguments.compare_config(parse(["compare", "--no-self-check"]))
    assert not config.self_check
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    usage = capsys.readouterr().out
    for flag in ("--self-check, --no-self-check", "--holdout N", "--restarts N"):
        assert flag in usage, flag
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--holdout", "0"])
    assert exit_.value.code == 2
    assert "argument --holdout: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert_cli_error(capsys, ["train", "--restarts", "2", "--no-self-check"], 2,
                     "--restarts 2 chooses among seeds by the self-check")
    assert_cli_error(capsys, ["train", "--restarts", "2", "--resume", str(tmp_path)], 2,
                     "--restarts 2 cannot go with --resume")
    with pytest.raises(ValueError, match="holdout must be >= 1 training images per class, got 0"):
        training.fit(_config(data, holdout=0), tmp_path / "bad")

    # Off: every training image is trained on and nothing of the self-check is written.
    cli.train(_config(data, epochs=1, self_check=False), tmp_path / "off")
    assert "on 48 images of brick, gravel" in capsys.readouterr().out
    assert not (tmp_path / "off" / selfcheck.FILE).exists()
    assert "self_check" not in json.loads((tmp_path / "off" / "metrics.json").read_text())["brick"]
    # A checkpoint saved before the self-check existed trained on every image.
    saved = dataclasses.asdict(cli.TrainConfig(seed=3))
    old = {k: v for k, v in saved.items() if k not in ("self_check", "holdout")}
    assert not cli.TrainConfig.from_saved(old).self_check
    assert cli.TrainConfig.from_saved(saved).self_check


def test_strip_data_holds_out_pixels_no_trained_image_shows(tmp_path):
    # scripts/holdout_strip_data.py: the files snl train holds out are cut from rows below
    # every trained crop; the test images are the default set's, byte for byte
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "holdout_strip_data.py"
    spec = importlib.util.spec_from_file_location("holdout_strip_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = dict(size=64, n_train=20, n_test_good=2, n_test_defect=1)
    record = module.build(tmp_path / "strip", **counts)
    held = split_holdout(tmp_path / "strip", "all", 8)
    for name, paths in held.held.items():
        boxes = {k: v for k, v in record.items() if k.startswith(f"{name}/")}
        assert {k for k, v in boxes.items() if v["held_out"]} == {
            p.relative_to(tmp_path / "strip").as_posix() for p in paths}
        lowest_trained = max(v["box"][0] + v["box"][2] for v in boxes.values()
                             if not v["held_out"])
        assert all(v["box"][0] >= lowest_trained for v in boxes.values() if v["held_out"])
    make_default_dataset(tmp_path / "default", **counts)
    for path in (tmp_path / "default").rglob("test/**/*.png"):
        twin = tmp_path / "strip" / path.relative_to(tmp_path / "default")
        assert twin.read_bytes() == path.read_bytes()
    # dataset.json records the moved boxes: no held-out image shares a trained pixel
    assert selfcheck.shared_pixels(held, tmp_path / "strip") == {n: 0 for n in held.held}
    default = selfcheck.shared_pixels(split_holdout(tmp_path / "default"), tmp_path / "default")
    assert sum(default.values()) > 0
    check = {"shared_pixels": default,
             "classes": {n: {"held_out": 8, "image_auroc": 0.9} for n in default}}
    assert "Note:" in selfcheck.summary_line({**check, "flag_below": 0.77, "flagged": []})
    check["shared_pixels"] = dict.fromkeys(default, 0)
    assert "Note:" not in selfcheck.summary_line({**check, "flag_below": 0.77, "flagged": []})
    assert selfcheck.shared_pixels(held, tmp_path / "default") is None  # not its files
    (tmp_path / "default" / "dataset.json").unlink()  # any other data: not known
    assert selfcheck.shared_pixels(held, tmp_path / "default") is None


def test_boxes_share_pixels_only_when_they_overlap():
    assert selfcheck._intersect([0, 0, 64, 64], [63, 63, 64, 64])
    assert not selfcheck._intersect([0, 0, 64, 64], [64, 0, 64, 64])  # touching rows
    assert not selfcheck._intersect([0, 0, 64, 64], [0, 64, 64, 64])  # touching columns
    assert selfcheck._intersect([10, 10, 5, 5], [0, 0, 64, 64])  # inside


def test_restarts_say_when_a_class_is_flagged_in_every_seed():
    from snl.cli import restarts

    def run(**figures):
        classes = {n: {"image_auroc": f} for n, f in figures.items()}
        return {"check": {"classes": classes,
                          "flagged": [n for n, f in figures.items() if f < selfcheck.FLAG_BELOW]}}

    runs = [run(brick=0.9, tissue=0.55), run(brick=0.7, tissue=0.6), run(brick=0.95, tissue=0.5)]
    assert restarts.flagged_in_every_seed(runs) == ["tissue"]
    assert restarts.every_seed_line(runs) == (
        "restarts: flagged in all 3 seeds: tissue 55.0, 60.0, 50.0. A class flagged whatever "
        "the seed is more likely one the model does not learn at this budget than a broken "
        "run; more seeds are unlikely to help")
    assert restarts.every_seed_line(runs[:1]) is None  # one run: nothing to compare
    assert restarts.every_seed_line([run(brick=0.7), run(brick=0.9)]) is None


def test_broken_class_runs_are_more_than_ten_points_under_their_groups_median():
    aurocs = [0.90, 0.85, 0.74, 0.76, 0.70, 0.71, 0.50]
    groups = ["brick"] * 4 + ["tissue"] * 3
    # brick's median 0.805: 0.74 is 6.5 points under it, not broken; tissue's 0.70: 0.50 is
    assert selfcheck.broken(aurocs, groups).tolist() == [False] * 6 + [True]
    assert selfcheck.broken([0.9, 0.5], [("snl", "brick"), ("rd", "brick")]).tolist() == [
        False, False]  # each its own group
