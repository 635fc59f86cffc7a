"""The whole training step and inference of SNL and of the RD baseline, in the modes a user
would choose.

A training step is the teacher forward, OCBE, CRAM (SNL), the decoder, every loss term, the
backward and Adam's step; inference is ``predict`` (scores and maps). Each is timed per
structure in the modes:

- ``eager``: fp32, as ``snl train`` runs by default;
- ``bf16``: the same under ``torch.autocast(dtype=torch.bfloat16)`` (the ops read bf16
  features and accumulate in fp32);
- ``graph``: the fp32 step captured once in a CUDA graph and replayed (Adam with
  ``capturable=True``; GPU only);
- ``channels_last``: ``eager`` with the networks' weights and the images in channels-last
  memory (``snl train --channels-last``). Left out of the GPU round, whose step budget holds
  the three modes above; time it with ``-k channels_last``;
- ``compile``: the loss (or ``predict``) through ``torch.compile`` (the backward through
  AOTAutograd, Adam eager). Slow to compile: the GPU round runs it last, with the other
  ``compile`` benchmarks, if time is left; on a CPU it runs only with ``SNL_SLOW_TESTS=1``.

``fused=True`` (kernels where they run, the shared PyTorch forms on a CPU) and ``fused=False``
(the plain reference ops) are both timed, so that each mode shows whether the fused path pays.
The CPU default setting of ``snl train`` on a CPU (EfficientNet-Lite0, 128 px, batch 16);
WRN50 at 256 px on a GPU, batch 16 for the step and 64 for inference (``SNL_INFER_BATCH``).
The teacher is random (``pretrained=False``): timings do not depend on the weights.
Inference records images per second in ``extra_info["images_per_s"]``. At the end of the
session ``conftest.py`` prints SNL's step over RD's, per mode and path, from the medians.
"""

from __future__ import annotations

import os

import pytest
import torch
from harness import sync
from shapes import DEVICE, HAS_GPU

BACKBONE, SIZE = ("wide_resnet50_2", 256) if HAS_GPU else ("tf_efficientnet_lite0", 128)
BATCH = 16
INFER_BATCH = int(os.environ.get("SNL_INFER_BATCH", "64" if HAS_GPU else "16"))
MODES = ("eager", "bf16", "graph", "channels_last", "compile")
ROUNDS = 20 if HAS_GPU else 5


def _skip(mode: str) -> None:
    pytest.importorskip("timm", reason="the model needs timm")
    if mode == "graph" and not HAS_GPU:
        pytest.skip("CUDA graphs need a CUDA GPU")
    if mode == "compile" and not HAS_GPU and os.environ.get("SNL_SLOW_TESTS") != "1":
        pytest.skip("torch.compile of the whole model takes minutes on a CPU (SNL_SLOW_TESTS=1)")


def _model(structure: str, fused: bool, mode: str):
    import snl

    torch.manual_seed(0)
    model = snl.SNL(backbone=BACKBONE, pretrained=False, structure=structure,
                    fused=fused).to(DEVICE)
    return model.to(memory_format=_layout(mode))


def _layout(mode: str) -> torch.memory_format:
    return torch.channels_last if mode == "channels_last" else torch.contiguous_format


def _autocast(mode: str):
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=mode == "bf16")


def _captured(fn):
    """``fn`` captured in a CUDA graph after three warm-up calls on a side stream; returns
    the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def training_step(model, mode: str):
    """One training step of ``model`` in ``mode`` as a callable (warmed up or captured)."""
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999),
                                 capturable=mode == "graph")
    images = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE).contiguous(
        memory_format=_layout(mode))
    loss_fn = model.loss
    if mode == "compile":
        loss_fn = torch.compile(model.loss)

    def step() -> None:
        with _autocast(mode):
            losses = loss_fn(images)
        # In a graph the gradients stay allocated and are zeroed in place: set_to_none would
        # free the memory the captured backward writes into.
        optimizer.zero_grad(set_to_none=mode != "graph")
        losses["total"].backward()
        optimizer.step()

    if mode == "graph":
        return _captured(step)
    step()
    step()  # warm-up (compilation, autotuning) and a check that the step runs
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    return step


def inference(model, mode: str):
    """``predict`` of ``model`` on an inference batch in ``mode`` as a callable."""
    model.eval()
    images = torch.randn(INFER_BATCH, 3, SIZE, SIZE, device=DEVICE).contiguous(
        memory_format=_layout(mode))
    predict = torch.compile(model.predict) if mode == "compile" else model.predict

    def run():
        with _autocast(mode):
            return predict(images)

    if mode == "graph":
        return _captured(run)
    scores, maps = run()
    assert torch.isfinite(scores).all()
    assert maps.shape == (INFER_BATCH, 1, SIZE, SIZE)
    return run


def _record(benchmark, fn, kind: str, structure: str, mode: str, fused: bool, batch: int):
    def timed() -> None:
        fn()
        sync()

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    info = benchmark.extra_info
    info.update(kind=kind, structure=structure, mode=mode, fused=fused, backbone=BACKBONE,
                image_size=SIZE, batch=batch,
                device=torch.cuda.get_device_name(0) if HAS_GPU else "cpu")
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        info["median_ms"] = round(median * 1e3, 3)
        if kind == "inference":
            info["images_per_s"] = round(batch / median, 1)


def _every_case(test):
    """Every structure x mode x path."""
    for name, values, ids in (("structure", ["snl", "rd"], None), ("mode", MODES, None),
                              ("fused", [True, False], ["fused", "reference"])):
        test = pytest.mark.parametrize(name, values, ids=ids)(test)
    return test


@_every_case
def test_training_step(benchmark, structure, mode, fused):
    _skip(mode)
    step = training_step(_model(structure, fused, mode), mode)
    _record(benchmark, step, "training_step", structure, mode, fused, BATCH)


@_every_case
def test_inference(benchmark, structure, mode, fused):
    _skip(mode)
    run = inference(_model(structure, fused, mode), mode)
    _record(benchmark, run, "inference", structure, mode, fused, INFER_BATCH)
