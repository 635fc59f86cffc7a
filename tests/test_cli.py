"""The snl command: train, resume, eval, predict, export, distributed training, checkpoints."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import socket
import warnings

import pytest
import torch
from support import assert_cli_error, require_model_extra

from snl import checkpoint, cli
from snl.data import DEFECT_TYPES, PROBE_KINDS, make_default_dataset

require_model_extra()

TINY = {"size": 64, "n_train": 6, "n_test_good": 3, "n_test_defect": 2,
        "classes": ["brick", "grass"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "textures"
    make_default_dataset(root, seed=0, **TINY)
    return root


def _config(data, **kw):
    base = {"data": str(data), "backbone": "tf_efficientnet_lite0", "image_size": 64,
            "epochs": 2, "batch_size": 4, "device": "cpu", "num_centers": 4}
    base.update(kw)
    return cli.TrainConfig(**base)


def _states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_writes_run_folder_and_resume_is_exact(data, tmp_path, monkeypatch):
    full = cli.train(_config(data), tmp_path / "full")
    run = tmp_path / "full"
    for name in ("config.json", "history.json", "metrics.json", "report.md", "report.html",
                 "curves.json", "roc.png"):
        assert (run / name).is_file(), name
    table = json.loads((run / "metrics.json").read_text())
    assert set(table) == {"brick", "grass", "mean"}
    assert 0.0 <= table["mean"]["pixel_auroc"] <= 1.0
    assert "| **mean** |" in (run / "report.md").read_text()
    assert list((run / "overlays").glob("*.png"))

    # Crash right after the first epoch's checkpoint, then resume.
    real_save = checkpoint.save_atomic

    def save_then_crash(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        cli.train(_config(data), tmp_path / "crashed")
    monkeypatch.setattr(checkpoint, "save_atomic", real_save)
    assert checkpoint.load(tmp_path / "crashed" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = cli.train(cli.TrainConfig(), tmp_path / "crashed", resume=True,
                        evaluate_after=False)
    _states_equal(full.state_dict(), resumed.state_dict())


def test_eval_reproduces_and_predict_writes(data, tmp_path, capsys):
    cli.train(_config(data, epochs=1), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert cli.main(["eval", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev"),
                     "--device", "cpu"]) == 0
    run_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    eval_metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert eval_metrics == run_metrics
    run_types = json.loads((tmp_path / "run" / "metrics_by_type.json").read_text())
    assert set(run_types["brick"]) == set(DEFECT_TYPES)

    assert cli.main(["eval", str(ckpt), "--data", str(data), "--out", str(tmp_path / "pr"),
                     "--device", "cpu", "--probes", "mixup,cutpaste", "--probe-count", "2"]) == 0
    printed = capsys.readouterr().out
    assert "brick / mixup" in printed
    assert "grass / cutpaste" in printed
    assert json.loads((tmp_path / "pr" / "metrics.json").read_text()) == run_metrics
    types = json.loads((tmp_path / "pr" / "metrics_by_type.json").read_text())
    for name in ("brick", "grass", "mean"):
        assert set(types[name]) == {*DEFECT_TYPES, *PROBE_KINDS}
        for kind in DEFECT_TYPES:  # the real defect types are scored as without probes
            assert types[name][kind] == run_types[name][kind]
        assert 0.0 <= types[name]["mixup"]["aupro"] <= 1.0
    assert len(list((tmp_path / "pr" / "probes" / "grass" / "test" / "cutpaste").glob("*"))) == 2
    assert_cli_error(capsys, ["eval", str(ckpt), "--data", str(data), "--probes", "blend"], 2,
                     "--probes 'blend'")

    # Training stored the F1 threshold of its evaluation with the checkpoint; eval replaces
    # it (here by a false-positive-rate one) and predict reports scores, normalised, labels.
    stored = checkpoint.load(ckpt)["calibration"]
    assert stored == json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert stored["method"] == "f1"
    assert stored["low"] <= stored["threshold"] <= stored["high"]
    assert cli.main(["eval", str(ckpt), "--data", str(data), "--out", str(tmp_path / "fp"),
                     "--device", "cpu", "--threshold", "fpr=0"]) == 0
    assert "threshold (fpr=0)" in capsys.readouterr().out
    calibrated = checkpoint.load(ckpt)["calibration"]
    assert calibrated["method"] == "fpr=0"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", str(ckpt), "--threshold", "fpr=2"])
    assert exit_.value.code == 2
    assert "argument --threshold: threshold must be 'f1' or 'fpr=F'" in capsys.readouterr().err

    images = sorted((data / "brick" / "test").glob("*/*.png"))
    assert cli.main(["predict", str(ckpt), *map(str, images), "--out", str(tmp_path / "pred"),
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    scores = json.loads((tmp_path / "pred" / "scores.json").read_text())
    assert [s["path"] for s in scores] == [str(p) for p in images]
    assert all(os.path.isfile(s["overlay"]) for s in scores)
    assert all(s["score"] > 0 for s in scores)
    assert printed[0].split() == ["score", "normalised", "label", "path"]
    span = calibrated["high"] - calibrated["low"]
    for s, line in zip(scores, printed[1:], strict=True):
        want = min(max((s["score"] - calibrated["threshold"]) / span + 0.5, 0.0), 1.0)
        assert s["normalised"] == pytest.approx(want)
        assert (s["normalised"] >= 0.5) == (s["label"] == "anomalous")
        assert s["label"] == ("anomalous" if s["score"] >= calibrated["threshold"] else "normal")
        assert line.split() == [f"{s['score']:.6f}", f"{s['normalised']:.4f}", s["label"],
                                s["path"]]
    # fpr=0: no good test image of the evaluated set is labelled anomalous. predict scores
    # one image at a time, the evaluation in batches: the same image's score may differ by
    # float32 rounding, which can carry the highest good score a few ulps over the threshold.
    threshold = calibrated["threshold"]
    assert all(s["label"] == "normal" or s["score"] == pytest.approx(threshold, rel=1e-6)
               for s in scores if "/good/" in s["path"])


def test_existing_run_needs_resume(data, tmp_path, capsys):
    cli.train(_config(data, epochs=1), tmp_path / "runs" / "x", evaluate_after=False)
    assert_cli_error(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "runs"),
                              "--name", "x", "--device", "cpu"], 1,
                     "already holds a run; use --resume")


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        cli.train(_config(tmp_path / "nowhere"), tmp_path / "run")


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def torn_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_checkpoint_load_rejects_other_files(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        checkpoint.load(tmp_path / "bad.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not an snl checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, config_dict, run_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from snl import distributed

    world = distributed.setup("cpu")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = cli.train(cli.TrainConfig(**config_dict), run_dir, world=world)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        # The last step's gradients: their layouts, and how many storages hold them (views of
        # DDP's buckets share a few; gradients of their own take one each).
        grads = [(p.grad.stride(), p.stride()) for p in model.trainable_parameters()]
        storages = {p.grad.untyped_storage().data_ptr() for p in model.trainable_parameters()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"warnings": [str(w.message) for w in caught],
                       "strides_match": all(g == q for g, q in grads),
                       "parameters": len(grads), "storages": len(storages)}, f)
    finally:
        distributed.teardown(world)


def test_precision_option_trains_evaluates_and_predicts_in_bf16(data, tmp_path, capsys):
    # auto: bf16 on a GPU, fp32 on a CPU; a config saved before the option was fp32
    assert cli.TrainConfig().resolved(torch.device("cpu")).precision == "fp32"
    assert cli.TrainConfig().resolved(torch.device("cuda")).precision == "bf16"
    assert cli.TrainConfig(precision="bf16").resolved(torch.device("cpu")).precision == "bf16"
    assert cli.TrainConfig.from_saved({"structure": "snl"}).precision == "fp32"
    from snl.cli import arguments

    parse = arguments.build_parser("snl").parse_args
    assert arguments.train_config(parse(["train"])).pin_memory is True
    assert arguments.train_config(parse(["train", "--no-pin-memory"])).pin_memory is False
    assert arguments.train_config(parse(["train", "--precision", "fp32"])).precision == "fp32"
    # data loader processes: none on a CPU, up to 8 on a GPU, unless given
    assert cli.TrainConfig().resolved(torch.device("cpu")).workers == 0
    assert cli.TrainConfig().resolved(torch.device("cuda")).workers == min(8, os.cpu_count() or 1)
    assert cli.TrainConfig(workers=3).resolved(torch.device("cuda")).workers == 3
    assert arguments.train_config(parse(["train", "--workers", "2"])).workers == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(["train", "--workers", "-1"])
    assert "expected an integer >= 0, got -1" in capsys.readouterr().err
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--backbone", "tf_efficientnet_lite0",
                     "--image-size", "64", "--epochs", "1", "--batch-size", "4",
                     "--num-centers", "4", "--device", "cpu", "--precision", "bf16",
                     "--no-self-check", "--out", str(tmp_path), "--name", "run"]) == 0
    assert "(snl, fused=True, bf16)" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    ckpt = run / "checkpoints" / "last.pt"
    model, config, _ = cli.load_run(ckpt, "cpu")
    assert (config.precision, model.precision) == ("bf16", "bf16")
    model, config, _ = cli.load_run(ckpt, "cpu", "fp32")
    assert (config.precision, model.precision) == ("fp32", "fp32")
    # eval and predict take the run's precision unless told
    for precision in ([], ["--precision", "fp32"]):
        out = tmp_path / f"pred{len(precision)}"
        assert cli.main(["predict", str(ckpt), str(next(data.rglob("*.png"))), "--out",
                         str(out), "--device", "cpu", *precision]) == 0
        assert (out / "scores.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", str(ckpt), "x.png", "--precision", "fp16"])
    assert exit_.value.code == 2
    assert "argument --precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_two_process_gloo_training_keeps_ranks_identical(data, tmp_path):
    # 128 px: the size at which a channels-last layout inside the model once made DDP warn
    # "Grad strides do not match bucket view strides" (and copy every gradient).
    config = dataclasses.asdict(_config(data, epochs=1, image_size=128))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), config, str(tmp_path / "run"),
                                                   str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    _states_equal(a, b)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not [w for w in seen["warnings"] if "strides" in w], seen["warnings"]
        assert seen["strides_match"]
        # gradients are views of a few all-reduce buckets, not one storage each
        assert seen["storages"] < seen["parameters"] // 4, seen
    table = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(table) == {"brick", "grass", "mean"}
    # Only rank 0 wrote files; a single-process run of the same model would use all images.
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_onnx_export_matches_pytorch(data, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    pytest.importorskip("onnx", reason="onnx not installed")
    cli.train(_config(data, epochs=1), tmp_path / "run", evaluate_after=False)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    images = torch.randn(2, 3, 64, 64)
    out = cli.export_onnx(ckpt, tmp_path / "m.onnx")  # not evaluated: scores and maps only
    model, _, _ = cli.load_run(ckpt, "cpu")
    model.fused = False
    scores, maps = model.predict(images)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["scores", "maps"]
    o_scores, o_maps = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(o_scores), scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(o_maps), maps, atol=1e-4, rtol=1e-4)

    # With a stored calibration the export carries the normalisation and the labels.
    threshold = float(scores.min() + scores.max()) / 2
    cli.store_calibration(ckpt, {"threshold": threshold, "low": float(scores.min()) - 1,
                                 "high": float(scores.max()) + 1, "method": "f1"})
    out = cli.export_onnx(ckpt, tmp_path / "c.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["scores", "maps", "normalised", "labels"]
    o_scores, _, o_norm, o_labels = session.run(None, {"images": images.numpy()})
    span = float(scores.max() - scores.min()) + 2
    torch.testing.assert_close(torch.from_numpy(o_norm), (scores - threshold) / span + 0.5,
                               atol=1e-4, rtol=1e-4)
    assert o_labels.tolist() == (o_scores >= threshold).astype(int).tolist()
    assert sorted(o_labels.tolist()) == [0, 1]


def test_data_seed_is_separate_from_the_training_seed(tmp_path, monkeypatch):
    from snl import distributed
    from snl.cli import arguments, training

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = []
    monkeypatch.setattr(training, "make_default_dataset",
                        lambda root, seed: made.append((root, seed)))
    world = distributed.setup("cpu")
    parse = arguments.build_parser("snl").parse_args
    config = arguments.train_config(parse(["train", "--seed", "2"]))
    assert (config.seed, config.data_seed) == (2, None)
    default = tmp_path / "snl" / "textures"
    # Without --data-seed the data set follows --seed, as before the option existed.
    assert training.resolve_data(cli.TrainConfig(), world) == default
    assert training.resolve_data(config, world) == default.with_name("textures-seed2")
    config = arguments.train_config(parse(["train", "--seed", "2", "--data-seed", "0"]))
    assert training.resolve_data(config, world) == default
    assert [seed for _, seed in made] == [0, 2, 0]


def test_loss_formulation_flags_reach_the_model(tmp_path):
    """``snl train`` / ``snl compare`` loss flags fill TrainConfig, whose defaults are the
    model's, and build_model passes them on; a bad weight is named."""
    import snl
    from snl import distributed
    from snl.cli import arguments, training

    parse = arguments.build_parser("snl").parse_args
    defaults = arguments.train_config(parse(["train"]))
    params = inspect.signature(snl.SNL).parameters
    for name in training.FORMULATION_FIELDS:
        assert getattr(defaults, name) == params[name].default, name
        assert getattr(cli.TrainConfig(), name) == params[name].default, name
    flags = ["--w-ch", "0.5", "--w-sp", "0", "--w-intra", "2", "--w-inter", "0.25", "--w-c", "3",
             "--w-rd", "0", "--compact-norm", "sum", "--residual-ratio", "4", "--cram-tau", "sqrt"]
    for command in (["train"], ["compare"]):
        args = parse(command + flags)
        to_config = arguments.train_config if command == ["train"] else arguments.compare_config
        config = to_config(args)
        assert training.formulation(config) == {
            "w_ch": 0.5, "w_sp": 0.0, "w_intra": 2.0, "w_inter": 0.25, "w_c": 3.0, "w_rd": 0.0,
            "compact_norm": "sum", "residual_ratio": 4, "cram_tau": "sqrt"}
    config = dataclasses.replace(config, backbone="tf_efficientnet_lite0", pretrained=False)
    model = training.build_model(config, distributed.setup("cpu"))
    assert model.loss_weights == snl.loss.LossWeights(0.5, 0.0, 2.0, 0.25, 3.0, 0.0)
    assert model.compact_norm == "sum"
    assert model.cram.phi[0].out_channels == model.arch.embed_dim // 4
    assert model.cram.log_tau.exp().item() == pytest.approx(model.arch.embed_dim ** 0.5)
    for bad in (["--w-c", "-1"], ["--w-rd", "nan"], ["--compact-norm", "max"],
                ["--cram-tau", "2"]):
        with pytest.raises(SystemExit):
            parse(["train", *bad])


def test_checkpoints_from_before_the_loss_options_resume_with_the_first_formulation():
    from snl.cli import training

    saved = dataclasses.asdict(cli.TrainConfig(seed=3))
    assert cli.TrainConfig.from_saved(saved) == cli.TrainConfig(seed=3)
    old = {k: v for k, v in saved.items() if k not in training.FORMULATION_FIELDS}
    config = cli.TrainConfig.from_saved(old)
    assert training.formulation(config) == training.V1_FORMULATION
    assert config.seed == 3


def test_an_epoch_reads_no_loss_on_the_host_per_step(monkeypatch):
    """The training loop sums the losses on the device: no float()/item() per step (each
    would wait for a GPU to finish the step), one read of the sums at the end, and the
    epoch's means are the float64 means of the steps' losses."""
    from torch.overrides import TorchFunctionMode

    from snl import distributed
    from snl.cli import training

    class HostReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("__float__", "item", "tolist", "__bool__", "__int__"):
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)

    def step(images):
        out = net(images).square().mean()
        return {"rd": out * 0.5, "total": out}

    batches = [torch.randn(4, 3) for _ in range(5)]
    seen = []

    def recording_step(images):
        losses = step(images)
        seen.append({k: float(v.detach()) for k, v in losses.items()})
        return losses

    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # the losses stay comparable
    history: list[dict] = []
    config = training.TrainConfig(epochs=1)
    sampler = type("Sampler", (), {"set_epoch": lambda self, epoch: None})()
    world = distributed.World()
    monkeypatch.setattr(training, "PROGRESS_SECONDS", 1e9)
    with HostReads() as reads:
        training._epoch(0, config, net, step, batches, sampler, optimizer, world, history)
    assert reads.names == ["tolist"]
    training._epoch(0, config, net, recording_step, batches, sampler, optimizer, world,
                    history)
    for key in ("rd", "total"):
        want = sum(s[key] for s in seen) / len(seen)
        assert history[0][key] == pytest.approx(want, rel=1e-12)
        assert history[1][key] == pytest.approx(want, rel=1e-12)


def test_compile_option_compiles_the_step_and_trains_the_same(data, tmp_path, monkeypatch,
                                                              capsys):
    """``--compile``: the step goes through torch.compile (here with AOTAutograd's eager
    backend: Inductor's C++ compile is slow on a CPU and is tested in test_model), the run
    trains to the parameters of an eager run to float rounding, and the option is saved."""
    from snl.cli import arguments, training

    parse = arguments.build_parser("snl").parse_args
    assert arguments.train_config(parse(["train"])).compile is False
    assert arguments.train_config(parse(["train", "--compile"])).compile is True
    monkeypatch.setattr(training, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    calls = []
    real = training.compiled
    monkeypatch.setattr(training, "compiled", lambda m: calls.append(m) or real(m))
    torch._dynamo.reset()
    argv = ["train", "--data", str(data), "--backbone", "tf_efficientnet_lite0",
            "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--num-centers", "4",
            "--device", "cpu", "--no-self-check", "--out", str(tmp_path)]
    capsys.readouterr()
    assert cli.main([*argv, "--compile", "--name", "compiled"]) == 0
    assert "(snl, fused=True, fp32, compiled)" in capsys.readouterr().out
    assert len(calls) == 1
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    assert cli.main([*argv, "--name", "eager"]) == 0
    assert len(calls) == 1
    a = checkpoint.load(tmp_path / "compiled" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "eager" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_channels_last_option_trains_in_nhwc_and_the_same(data, tmp_path, capsys):
    """``--channels-last``: the networks' 4-D weights and the batches are channels-last while
    training, the run's losses are a default run's to float rounding (the convolutions sum
    in another order), and the option is saved."""
    from snl.cli import arguments, training

    parse = arguments.build_parser("snl").parse_args
    assert arguments.train_config(parse(["train"])).channels_last is False
    assert arguments.train_config(parse(["train", "--channels-last"])).channels_last is True
    seen = []
    real_epoch = training._epoch

    def epoch(e, config, model, step_module, loader, *rest):
        real_forward = model.forward
        model.forward = lambda x: seen.append(x.is_contiguous(
            memory_format=torch.channels_last)) or real_forward(x)
        try:
            return real_epoch(e, config, model, step_module, loader, *rest)
        finally:
            del model.forward

    argv = ["train", "--data", str(data), "--backbone", "tf_efficientnet_lite0",
            "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--num-centers", "4",
            "--device", "cpu", "--no-self-check", "--out", str(tmp_path)]
    config = arguments.train_config(parse([*argv, "--channels-last"]))
    training._epoch, saved = epoch, training._epoch
    try:
        model = cli.train(config, tmp_path / "nhwc", evaluate_after=False)
    finally:
        training._epoch = saved
    assert "(snl, fused=True, fp32, channels-last)" in capsys.readouterr().out
    assert seen
    assert all(seen)
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert json.loads((tmp_path / "nhwc" / "config.json").read_text())["channels_last"] is True
    assert cli.main([*argv, "--name", "default"]) == 0
    # Adam moves a parameter whose gradient is about 0 by up to lr either way, so the
    # parameters are not compared; the epoch's mean losses are (the same to ~1e-4).
    a = checkpoint.load(tmp_path / "nhwc" / "checkpoints" / "last.pt")["history"][0]
    b = checkpoint.load(tmp_path / "default" / "checkpoints" / "last.pt")["history"][0]
    assert a.keys() == b.keys()
    for key in a:
        if key not in ("epoch", "seconds"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), key
