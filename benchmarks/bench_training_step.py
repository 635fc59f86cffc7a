"""One training step (loss, backward, Adam step) of SNL and of the RD baseline.

The CPU default setting of ``snl train`` (EfficientNet-Lite0 teacher, 128 px, batch 16) on a
CPU; WRN50 at 256 px on a GPU. Fused ops as ``snl train`` runs them (automatic backend:
kernels on a GPU; on a CPU the shared PyTorch forms, ``snl_kernels/shared_torch.py`` and
``snl_kernels/gram_path.py``), and the plain reference (``fused=False``) beside them. The
teacher is random (``pretrained=False``): timings do not depend on the weights. Compare the
``snl`` and ``rd`` rows of one run (BENCHMARKS.md records them).
"""

from __future__ import annotations

import pytest
import torch
from harness import sync
from shapes import DEVICE, HAS_GPU

BACKBONE, SIZE = ("wide_resnet50_2", 256) if HAS_GPU else ("tf_efficientnet_lite0", 128)
BATCH = 16


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("structure", ["snl", "rd"])
def test_training_step(benchmark, structure, fused):
    pytest.importorskip("timm", reason="the model needs timm")
    import snl

    torch.manual_seed(0)
    model = snl.SNL(backbone=BACKBONE, pretrained=False, structure=structure,
                    fused=fused).to(DEVICE).train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))
    images = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE)

    def step() -> None:
        losses = model.loss(images)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        sync()

    step()  # warm-up (and a check that the step runs)
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    benchmark.pedantic(step, rounds=5 if not HAS_GPU else 20, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(structure=structure, fused=fused, backbone=BACKBONE,
                                image_size=SIZE, batch=BATCH,
                                device=torch.cuda.get_device_name(0) if HAS_GPU else "cpu")
