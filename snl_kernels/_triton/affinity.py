"""Triton kernels of the affinity losses; the math is in ``snl_kernels/intra_affinity_loss.py``
and ``snl_kernels/inter_affinity_loss.py``.

Every operand is seen as a (B, R, K) matrix per sample: rows R and a reduction axis K, one of
them the channels and the other the pixels of a (B, C, H, W) tensor read through its four
strides (``PIX_ROWS`` says which), so any layout is read in place. Row or column scales (the
inverse norms) are applied to tiles as they are loaded; the normalised features never exist
in memory.

This module gathers the launchers of four files, one kernel family each:
``affinity_tiles.py`` (the loaders, ``_dot`` and the tile choices they share),
``affinity_delta.py`` (Delta tiles, the tiled backward), ``affinity_prepared.py`` (l1 at
"tf32x3" from operands prepared for Hopper's asynchronous wgmma), ``affinity_gram.py`` (the
Gram path, the scaled products) and ``affinity_norms.py`` (norms, pooling).

Kernels:
- ``_inv_norm_kernel``: 1 / max(|row|, eps) for every row.
- ``_delta_kernel``: a tile of Delta = A_T B_T^T - A_S B_S^T formed from the stacked
  operands, ``-(A_S (B_S - B_T)^T + (A_S - A_T) B_T^T)``, so rounding scales with the
  difference; it writes the tile's sum of Delta^2 or |Delta| (a per-tile partial), or the
  tile of dL/dDelta (inter-affinity backward, where C_a x C_b is small).
- ``_intra_tiled_grad_kernel``: dL/dX = -+2 X G for a block of pixels and channels, G from
  the Delta tiles of the pixel pairs recomputed on chip (l2), or for l1 from the forward's
  sign bits of Delta (N^2 / 8 bytes per sample; no N x N float matrix in memory).
- ``_prepare_kernel``, ``_delta_prepared_kernel``, ``_grad_prepared_kernel``: the l1 loss's
  Delta tiles and its backward's products with the sign bits at "tf32x3", from normalised
  features split into tf32 parts beforehand (``affinity_prepared.py``).
- ``_gram_prepare_kernel`` / ``_gram_loss_kernel`` / ``_gram_apply_kernel``: the C x C Gram
  form of intra-affinity l2: the pixels' norms with the loss's operands E and D written
  once, rounded, for asynchronous wgmma (at "tf32" and "ieee"); the loss from the upper
  triangle of tile pairs, which also writes the backward's Grams (formed once, by the
  forward when it runs with gradients); then their products with the features (up to 256
  channels with the norm backward in the same kernel, ``_gram_apply_norm_kernel``).
- ``_scaled_mm_kernel``: the inter-affinity backward products (dL/dDelta) Q^ and (.)^T P^.
- ``_norm_bwd_kernel``: back through x = f / max(|f|, eps), per row.
- ``_pool_kernel`` / ``_unpool_kernel``: adaptive average pooling and its gradient.

Per-tile partial sums are added by ``torch.sum`` over a fixed-size buffer: no atomics, the
same bits on every run. Products run at the precision the launchers are given (decided in
``snl_kernels/precision.py``): tf32 operands rounded to nearest, three tf32 products
("tf32x3", about fp32), or fp32 ("ieee"). The Delta form keeps rounding proportional to the
student-teacher difference, which is what makes tf32 accurate enough.
"""

from .affinity_delta import (
                             DELTA_GROUP,
                             TILED_GROUP,
                             delta,
                             delta_group,
                             intra_tiled_grad,
                             intra_tiled_grad_group,
)
from .affinity_gram import (
                             MM_GROUP,
                             apply_norm_applies,
                             gram_grad,
                             gram_grad_features,
                             gram_loss,
                             gram_loss_block,
                             gram_prepare,
                             prepared_applies,
                             scaled_mm,
                             scaled_mm_group,
)
from .affinity_norms import (
                             NORM_GROUP,
                             POOL_GROUP,
                             inv_norms,
                             norm_backward,
                             norm_backward_group,
                             pool,
                             pool_with_norms,
                             unpool,
                             unpool_group,
)
from .affinity_prepared import inter_applies, inter_delta_l1, inter_prepare
from .affinity_tiles import (
                             BLOCK_ELEMENTS,
                             BLOCK_GRAM,
                             BLOCK_GRAM_GPU,
                             BLOCK_K,
                             BLOCK_ROWS,
                             BLOCK_TILE,
                             BLOCK_TILE_GPU,
                             INTERPRETED,
                             MAX_BLOCK_C,
                             MAX_BLOCK_C_GPU,
                             MAX_BLOCK_C_SIGNS,
                             MAX_BLOCK_C_SIGNS_GPU,
                             _dot,
                             _tiles,
)

__all__ = [
    "BLOCK_ELEMENTS", "BLOCK_GRAM", "BLOCK_GRAM_GPU", "BLOCK_K", "BLOCK_ROWS", "BLOCK_TILE",
    "BLOCK_TILE_GPU", "DELTA_GROUP", "INTERPRETED", "MAX_BLOCK_C", "MAX_BLOCK_C_GPU",
    "MAX_BLOCK_C_SIGNS", "MAX_BLOCK_C_SIGNS_GPU", "MM_GROUP", "NORM_GROUP", "POOL_GROUP",
    "TILED_GROUP", "_dot", "_tiles", "apply_norm_applies", "delta", "delta_group",
    "gram_grad", "gram_grad_features", "gram_loss", "gram_loss_block", "gram_prepare",
    "inter_applies", "inter_delta_l1", "inter_prepare", "intra_tiled_grad",
    "intra_tiled_grad_group", "inv_norms", "norm_backward", "norm_backward_group", "pool",
    "pool_with_norms", "prepared_applies", "scaled_mm", "scaled_mm_group", "unpool",
    "unpool_group",
]
