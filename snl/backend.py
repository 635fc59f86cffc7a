"""The ``backend=`` the model passes to snl_kernels' ops, and autocast switched off around them.

``fused=True`` passes ``backend=None``: ``SNL_BACKEND`` and then automatic choice decide per
op (on CUDA tensors the op's measured order, ``snl_kernels.dispatch.AUTO_ORDER``; the
reference elsewhere), as :mod:`snl_kernels.dispatch` explains. ``fused=False`` passes
``backend="torch"``: the plain-PyTorch reference of :mod:`snl_kernels.reference`, whatever
``SNL_BACKEND`` says. The model has no dispatch of its own: every op is one of snl_kernels'
public functions.

With ``SNL_BACKEND=triton`` (or ``cuda``) every op of a fused model is asked for that backend,
and an op that cannot run there raises ``snl_kernels.BackendUnavailableError`` naming the
reasons, as the library does for any explicit request; leave ``SNL_BACKEND`` unset (or
``auto``) to get kernels where they can run and the reference elsewhere.

Under ``torch.autocast`` the ops run with autocast switched off (:func:`full_precision`):
they take the low-precision features as they are and accumulate in fp32 themselves, as
DESIGN §2 requires; left on, autocast would recast the reference's matmuls, convs and
interpolations to bf16/fp16 (CRAM's ``|e|^2 - 2 e.c + |c|^2`` would cancel in bf16).
"""

from __future__ import annotations

import torch


def op_backend(fused: bool) -> str | None:
    """The ``backend=`` of every op: None (kernels, automatic) or "torch" (the reference)."""
    return None if fused else "torch"


def full_precision(device_type: str) -> torch.autocast:
    """A context in which autocast is off, for calling the ops on ``device_type`` tensors."""
    return torch.autocast(device_type=device_type, enabled=False)
