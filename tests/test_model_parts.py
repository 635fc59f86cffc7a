"""Parts of the model layer that need no timm: the backend passed to the ops, CRAM, the
losses, autocast.

These run everywhere, also where timm (and so ``tests/test_model.py``) cannot be imported.
"""

from __future__ import annotations

import sys

import pytest
import torch
from support import NO_TRITON

import snl
import snl_kernels
from snl import config as snl_config
from snl.backend import full_precision, op_backend
from snl.loss import LossWeights, common_dtype, rd_loss, snl_loss
from snl_kernels import reference


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    """Tests choose backends themselves; an SNL_BACKEND left in the shell must not decide."""
    monkeypatch.delenv("SNL_BACKEND", raising=False)


def levels(b=2, channels=(8, 16, 32), size=32, seed=0, dtype=torch.float32):
    """Teacher and student levels at strides 4, 8, 16 of a ``size`` image."""
    g = torch.Generator().manual_seed(seed)
    teachers, students = [], []
    for c, s in zip(channels, (4, 8, 16), strict=True):
        t = torch.randn(b, c, size // s, size // s, generator=g)
        teachers.append(t.to(dtype))
        students.append((t + 0.5 * torch.randn(t.shape, generator=g)).to(dtype)
                        .requires_grad_(True))
    return teachers, students


# snl_loss's distillation terms are one snl_distillation_loss call (which hands its backend
# to the separate ops where it runs them: tests/test_distillation.py); rd_loss calls
# spatial_channel_loss.
OPS = ("snl_distillation_loss", "spatial_channel_loss", "cram", "anomaly_map")


@pytest.fixture
def backends_asked(monkeypatch):
    """The ``backend=`` of every call the model layer makes to snl_kernels' public ops."""
    asked = []
    for name in OPS:
        op = getattr(snl_kernels, name)

        def recording(*args, op=op, name=name, **kwargs):
            asked.append((name, kwargs.get("backend", "positional or none")))
            return op(*args, **kwargs)

        monkeypatch.setattr(snl_kernels, name, recording)
    return asked


@pytest.mark.parametrize(("fused", "backend"), [(True, None), (False, "torch")])
def test_the_model_passes_one_backend_to_every_op(backends_asked, fused, backend):
    assert op_backend(fused) == backend
    teachers, students = levels()
    torch.manual_seed(0)
    _, out = snl.CRAM(dim=8, num_centers=2, fused=fused)(torch.randn(2, 8, 2, 2))
    snl_loss(teachers, students, out.compact, LossWeights(), backend=op_backend(fused))
    rd_loss(teachers, students, backend=op_backend(fused))
    assert sorted(set(backends_asked)) == sorted(
        {(name, backend) for name in OPS if name != "anomaly_map"})


def test_fused_false_runs_the_reference_whatever_snl_backend_says(monkeypatch):
    monkeypatch.setenv("SNL_BACKEND", "no_such_backend")
    teachers, students = levels()
    out = snl_loss(teachers, students, None, LossWeights(), backend=op_backend(False))
    sc = reference.spatial_channel_loss(teachers, students)
    assert torch.equal(out["channel"], sc.pixel_mean)
    with pytest.raises(ValueError, match=r"SNL_BACKEND must be one of .* 'no_such_backend'"):
        snl_loss(teachers, students, None, LossWeights(), backend=op_backend(True))


# --------------------------------------------------------------------------- CRAM


def test_cram_module_outputs():
    torch.manual_seed(0)
    cram = snl.CRAM(dim=32, num_centers=4, fused=False)
    assert cram.centers.shape == (4, 32)
    torch.testing.assert_close(cram.log_tau.exp(), torch.tensor(32.0))
    e = torch.randn(2, 32, 3, 5)
    z, out = cram(e)
    assert z.shape == e.shape
    assert out.assign.shape == (2, 4, 3, 5)
    assert out.compact.shape == (2, 3, 5)
    torch.testing.assert_close(z, out.central + cram.phi(e - out.central))
    with pytest.raises(ValueError, match="num_centers must be a positive int, got 0"):
        snl.CRAM(8, 0)
    with pytest.raises(ValueError, match="tau must be a positive number or None, got -1"):
        snl.CRAM(8, 2, tau=-1)
    narrow = snl.CRAM(dim=32, num_centers=4, fused=False, residual_ratio=8)
    assert [m.out_channels for m in narrow.phi if isinstance(m, torch.nn.Conv2d)] == [4, 32]
    z, out = narrow(e)
    torch.testing.assert_close(z, out.central + narrow.phi(e - out.central))
    for bad in (0, 33, 2.0):
        with pytest.raises(ValueError, match=f"residual_ratio must be an int from 1 to the "
                                             f"embedding width 32, got {bad}"):
            snl.CRAM(32, 4, residual_ratio=bad)


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
def test_cram_fused_equals_reference(monkeypatch):
    monkeypatch.setenv("SNL_BACKEND", "triton")
    torch.manual_seed(0)
    fused = snl.CRAM(dim=48, num_centers=5, fused=True)
    plain = snl.CRAM(dim=48, num_centers=5, fused=False)
    plain.load_state_dict(fused.state_dict())
    e = torch.rand(2, 48, 4, 4)
    results = []
    for module in (fused, plain):
        z, out = module(e)
        (z.square().mean() + out.compact.mean()).backward()
        results.append((z, out, {n: p.grad for n, p in module.named_parameters()}))
    (z_f, out_f, g_f), (z_r, out_r, g_r) = results
    torch.testing.assert_close(z_f, z_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_f.compact, out_r.compact, rtol=1e-5, atol=1e-4)
    for n, g in g_r.items():
        torch.testing.assert_close(g_f[n], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(),
                                   msg=lambda m, n=n: f"grad of {n}: {m}")


# --------------------------------------------------------------------------- losses


def test_snl_loss_is_the_sum_of_the_ops():
    teachers, students = levels()
    out = snl_loss(teachers, students, torch.full((2, 1, 1), 3.0),
                   LossWeights(w_ch=1, w_sp=2, w_intra=3, w_inter=4, w_c=0.5, w_rd=6), "l1",
                   "l2", backend="torch")
    sc = reference.spatial_channel_loss(teachers, students)
    intra = sum(reference.intra_affinity_loss(t, s, "l1")
                for t, s in zip(teachers, students, strict=True))
    inter = (reference.inter_affinity_loss(teachers[0], teachers[1], students[0], students[1])
             + reference.inter_affinity_loss(teachers[1], teachers[2], students[1],
                                             students[2]))
    expected = dict(channel=sc.pixel_mean, spatial=sc.channel_mean, intra=intra, inter=inter,
                    compact=torch.tensor(3.0), rd=sc.sample_mean)
    assert set(out) == set(expected) | {"total"}
    for k, v in expected.items():
        torch.testing.assert_close(out[k], v, msg=k)
    total = (sc.pixel_mean + 2 * sc.channel_mean + 3 * intra + 4 * inter + 0.5 * 3.0
             + 6 * sc.sample_mean)
    torch.testing.assert_close(out["total"], total)
    assert rd_loss(teachers, students, backend="torch")["total"] == sc.sample_mean


def test_zero_weights_switch_terms_off():
    teachers, students = levels()
    out = snl_loss(teachers, students, None,
                   LossWeights(w_ch=0, w_sp=1, w_intra=0, w_inter=1, w_c=1, w_rd=0),
                   backend="torch")
    assert set(out) == {"spatial", "inter", "total"}
    with pytest.raises(ValueError, match="every loss weight is 0"):
        snl_loss(teachers, students, None, LossWeights(0, 0, 0, 0, 0, 0), backend="torch")


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
def test_losses_fused_equal_reference(monkeypatch):
    # Full fp32 products hold the wiring to elementwise tolerances; the affinity kernels'
    # tensor-core default has its own (norm-wise) accuracy tests in test_affinity.py.
    monkeypatch.setenv("SNL_DOT_PRECISION", "ieee")
    teachers, students = levels(size=64)
    grads = []
    outs = []
    for backend in ("triton", "torch"):
        out = snl_loss(teachers, students, None, LossWeights(), backend=backend)
        (grad,) = torch.autograd.grad(out["total"], students[0])
        outs.append(out)
        grads.append(grad)
    for k in outs[1]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_autocast_leaves_the_ops_in_fp32():
    """bf16 features go in as they are; the ops accumulate in fp32 as in DESIGN §2."""
    teachers, students = levels(size=64, dtype=torch.bfloat16)
    expected = snl_loss([t.float() for t in teachers], [s.float() for s in students], None,
                        LossWeights(), backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16), full_precision("cpu"):
        out = snl_loss(teachers, students, None, LossWeights(), backend="torch")
    for k in expected:
        assert out[k].dtype == torch.float32
        torch.testing.assert_close(out[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)


def test_common_dtype():
    t = [torch.zeros(1, 2, 2, 2, dtype=torch.bfloat16)]
    s = [torch.zeros(1, 2, 2, 2)]
    (t2,), (s2,) = common_dtype(t, s)
    assert t2.dtype == s2.dtype == torch.float32


# --------------------------------------------------------------------------- no timm


def test_missing_timm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"needs timm .*pip install timm"):
        snl_config.import_timm()
    with pytest.raises(ImportError, match=r"needs timm"):
        snl.SNL("resnet18", pretrained=False)
