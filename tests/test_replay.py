"""Recorded host programs (snl_kernels/_replay.py): a function replayed from its recording
computes what it computes as written, and what cannot be replayed runs as written."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils import _pytree as pytree

from snl_kernels import _replay


def _layout(*tensors):
    return tuple((t.shape, t.stride(), t.dtype) for t in tensors)


def _norms(inputs, eps):
    x, y = inputs
    both = torch.cat([x, y], dim=1)
    r = both.pow(2).sum(dim=0).sqrt().clamp_min_(eps)
    a, b = r.split([x.shape[1], y.shape[1]])
    out = torch.empty_like(x)
    out.copy_(x / a)
    return {"x": out, "y": y / b, "scale": x.shape[0], "mean": both.mean()}


def test_a_replayed_function_computes_what_it_computes_as_written():
    programs = _replay.Programs("norms")
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    first, spec = programs(_layout(x, y), _norms, (x, y), 1e-8)
    assert len(programs) == 1
    x2, y2 = torch.randn(4, 3), torch.randn(4, 5)
    leaves, spec2 = programs(_layout(x2, y2), _norms, (x2, y2), 1e-8)
    out, expected = pytree.tree_unflatten(leaves, spec2), _norms((x2, y2), 1e-8)
    assert out.keys() == expected.keys()
    assert out["scale"] == 4
    for name in ("x", "y", "mean"):
        assert torch.equal(out[name], expected[name])
    assert not torch.equal(out["x"], pytree.tree_unflatten(first, spec)["x"])
    _, source, _, _ = programs._programs[_layout(x, y)]
    # the 11 calls that make or change tensors, once each; metadata reads (shape) are gone
    assert len(re.findall(r"\bc\d+\(", source)) == 11


def test_the_program_drops_what_it_no_longer_needs():
    programs = _replay.Programs("norms")
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    programs("k", _norms, (x, y), 1e-8)
    source = programs._programs["k"][1]
    assert "del " in source  # the concatenation and the norms are freed before the return


def test_another_key_records_again():
    programs = _replay.Programs("norms")
    for columns in (3, 6, 3):
        x, y = torch.randn(4, columns), torch.randn(4, 5)
        leaves, spec = programs(_layout(x, y), _norms, (x, y), 1e-8)
        assert pytree.tree_unflatten(leaves, spec)["x"].shape == (4, columns)
    assert len(programs) == 2


def _reads_a_value(inputs):
    (x,) = inputs
    return x * float(x.sum())  # the factor depends on the data


def _data_shaped(inputs):
    (x,) = inputs
    return x[x > 0].sum()


FOREIGN = torch.ones(3)


def _foreign(inputs):
    (x,) = inputs
    return x + FOREIGN


@pytest.mark.parametrize(("fn", "why"), [(_reads_a_value, "float"), (_data_shaped, "data"),
                                     (_foreign, "neither an input")])
def test_what_cannot_be_replayed_runs_as_written(fn, why):
    programs = _replay.Programs(f"unreplayable {fn.__name__}")
    for _ in range(3):
        x = torch.randn(3)
        leaves, spec = programs("k", fn, (x,))
        assert torch.equal(pytree.tree_unflatten(leaves, spec), fn((x,)))
    assert why in _replay.reasons()[programs.name]


def _by_shape(inputs):
    (x,) = inputs
    return x * 2 if x.shape[0] > 2 else x + 2


def test_check_mode_finds_a_key_that_misses_a_distinction(monkeypatch):
    monkeypatch.setenv(_replay.ENV_VAR, "check")
    programs = _replay.Programs("by shape")
    programs("same key", _by_shape, (torch.randn(3),))
    programs("same key", _by_shape, (torch.randn(3),))  # the same program: fine
    with pytest.raises(_replay.ReplayMismatch, match="by shape"):
        programs("same key", _by_shape, (torch.randn(2),))


def test_replaying_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(_replay.ENV_VAR, "0")
    programs = _replay.Programs("off")
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    programs("k", _norms, (x, y), 1e-8)
    assert len(programs) == 0
    monkeypatch.setenv(_replay.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"SNL_REPLAY must be 0, 1 or check.*'sometimes'"):
        programs("k", _norms, (x, y), 1e-8)


def test_a_tool_routing_launches_turns_replaying_off(monkeypatch):
    pytest.importorskip("triton", reason="the launcher needs triton")
    from snl_kernels._triton import launch

    monkeypatch.setattr(launch, "hook", lambda *a: None)
    programs = _replay.Programs("hooked")
    programs("k", _norms, (torch.randn(4, 3), torch.randn(4, 5)), 1e-8)
    assert len(programs) == 0
