"""Central residual aggregation (SPEC §2.4): soft assignment of positions to centres.

Only the reference backend exists so far; the fused kernels (distances and logits kept on
chip) are tracked by the CRAM issue. Explicit ``backend="triton"`` or ``"cuda"`` raises
``BackendUnavailableError`` saying so; automatic mode uses the reference.
"""

from torch import Tensor

from . import checks, dispatch, reference
from .reference import CramOutput

OP = "cram"
IMPLEMENTED: tuple[str, ...] = ()


def cram(embedding: Tensor, centers: Tensor, log_tau: Tensor | float,
         backend: str | None = None) -> CramOutput:
    """Soft-assign each position of ``embedding`` to ``centers`` at temperature exp(log_tau).

    Args:
        embedding: (B, D, h, w) bottleneck embedding.
        centers: (K, D) centres.
        log_tau: log temperature, a float or a 0-dim tensor.
        backend: "torch", "triton", "cuda" or None (``SNL_BACKEND``, then automatic).

    Returns:
        ``CramOutput(central (B, D, h, w), assign (B, K, h, w), compact (B, h, w))``.
    """
    checks.check_cram(OP, embedding, centers, log_tau)
    dispatch.select_backend(OP, backend, (embedding, centers), IMPLEMENTED)
    return reference.cram(embedding, centers, log_tau)
