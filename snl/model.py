"""SNL: a frozen teacher, RD4AD's bottleneck, CRAM and a student decoder (docs/model.md §1).

::

    images (B, 3, H, W) -> teacher (frozen timm backbone) -> T_1, T_2, T_3 (strides 4, 8, 16)
      -> OCBE -> e (B, D, H/32, W/32) -> CRAM -> z = mu + phi(e - mu)
      -> decoder -> S_1, S_2, S_3 (same shapes as T_k)

Training compares S_k with T_k (:mod:`snl.loss`); inference turns their per-pixel cosine
distances into anomaly maps and scores (``anomaly_map`` op, blur sigma 4). Every op is one
of snl_kernels' public functions, called with the ``backend=`` of :mod:`snl.backend`:
``fused=True`` uses snl_kernels' kernels where they can run, ``fused=False`` the plain-PyTorch
reference; both give the same numbers.

``structure="rd"`` is the RD4AD baseline: no CRAM, loss ``sum_k mean(sample_k)``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

import snl_kernels
from snl_kernels import CramOutput

from .backend import full_precision, op_backend
from .config import Architecture, Normalization, architecture
from .cram import CRAM
from .loss import (
    COMPACT_NORMS,
    CRAM_TAUS,
    DEFAULT_COMPACT_NORM,
    DEFAULT_CRAM_TAU,
    LossWeights,
    common_dtype,
    rd_loss,
    snl_loss,
)
from .student import OCBE, Decoder
from .teacher import build_teacher

STRUCTURES = ("snl", "rd")
DISTANCES = ("l2", "l1")
#: "fp32", or "bf16": the networks under bf16 autocast (the ops read bf16 features and
#: accumulate in fp32, DESIGN §2).
PRECISIONS = ("fp32", "bf16")
MULTIPLE = 32  # the embedding is at stride 32


class Features(NamedTuple):
    """What one forward pass computes."""

    teachers: list[Tensor]  #: (B, C_k, H / s_k, W / s_k), s_k = 4, 8, 16
    students: list[Tensor]  #: same shapes
    cram: CramOutput | None  #: CRAM's outputs (None for structure="rd")


class SNL(nn.Module):
    """Structural teacher-student normality learning for multi-class anomaly detection.

    Args:
        backbone: timm model name with feature levels at strides 4, 8 and 16
            (``wide_resnet50_2`` as RD4AD, ``resnet50``, ``resnet18``,
            ``tf_efficientnet_lite0``, ...); a pretrained tag may follow a dot
            (``wide_resnet50_2.tv_in1k``: torchvision's weights, RD4AD's teacher).
        pretrained: load ImageNet weights into the teacher (see :mod:`snl.weights` for the
            sources tried; never a long network wait). False gives a random teacher, for
            tests only.
        weights: path of a local state dict for the teacher (timm or torchvision names);
            takes precedence over ``pretrained``.
        fused: snl_kernels' fused ops (True) or the plain-PyTorch reference (False).
        structure: "snl" (CRAM and structural losses) or "rd" (RD4AD's baseline).
        num_centers: K, CRAM's centres.
        w_ch, w_sp, w_intra, w_inter, w_c, w_rd: weights of the loss terms (0 switches one
            off): per-pixel and per-channel cosines, intra- and inter-affinity, CRAM's
            compactness, RD4AD's flattened cosine (docs/model.md §1).
        compact_norm: "dim" divides CRAM's compactness by the embedding width D, "sum" keeps
            the op's value (which grows with D).
        residual_ratio: CRAM's residual path ``phi`` goes through ``D / residual_ratio``
            channels (1: one D x D 1x1 convolution and BatchNorm).
        cram_tau: CRAM's initial temperature, "dim" (D) or "sqrt" (the square root of D).
        intra_distance, inter_distance: "l2" or "l1" for the affinity losses.
        sigma: Gaussian blur of the anomaly maps, in input pixels.
        map_mode: "add" or "mul": how the levels' maps are combined.
        precision: "fp32", or "bf16": the teacher, OCBE, CRAM's residual path and the decoder
            run under ``torch.autocast(dtype=torch.bfloat16)`` in ``forward`` (so in ``loss``
            and ``predict``); the ops take their bf16 features and accumulate in fp32. The
            losses, scores and maps stay float32. Assignable.

    Raises:
        ValueError: an option out of range, an unknown backbone or one without the levels.
        snl.WeightsUnavailableError: pretrained weights asked for and not to be had.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        fused: bool = True,
        structure: str = "snl",
        num_centers: int = 16,
        w_ch: float = LossWeights.w_ch,
        w_sp: float = LossWeights.w_sp,
        w_intra: float = LossWeights.w_intra,
        w_inter: float = LossWeights.w_inter,
        w_c: float = LossWeights.w_c,
        w_rd: float = LossWeights.w_rd,
        compact_norm: str = DEFAULT_COMPACT_NORM,
        residual_ratio: int = 1,
        cram_tau: str = DEFAULT_CRAM_TAU,
        intra_distance: str = "l2",
        inter_distance: str = "l2",
        sigma: float = 4.0,
        map_mode: str = "add",
        precision: str = "fp32",
    ):
        super().__init__()
        _check_choice("structure", structure, STRUCTURES)
        _check_choice("intra_distance", intra_distance, DISTANCES)
        _check_choice("inter_distance", inter_distance, DISTANCES)
        _check_choice("map_mode", map_mode, ("add", "mul"))
        self.precision = precision
        for name, value in (("w_ch", w_ch), ("w_sp", w_sp), ("w_intra", w_intra),
                            ("w_inter", w_inter), ("w_c", w_c), ("w_rd", w_rd),
                            ("sigma", sigma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        _check_choice("compact_norm", compact_norm, COMPACT_NORMS)
        _check_choice("cram_tau", cram_tau, CRAM_TAUS)
        self.loss_weights = LossWeights(w_ch, w_sp, w_intra, w_inter, w_c, w_rd)
        self.compact_norm = compact_norm
        if structure == "snl" and not any((w_ch, w_sp, w_intra, w_inter, w_c, w_rd)):
            raise ValueError("every loss weight is 0: switch at least one term on")

        self.arch: Architecture = architecture(backbone)
        self._fused = bool(fused)
        self.structure = structure
        self.intra_distance = intra_distance
        self.inter_distance = inter_distance
        self.sigma = float(sigma)
        self.map_mode = map_mode
        arch = self.arch
        self.teacher = build_teacher(arch, pretrained, weights)
        self.ocbe = OCBE(arch.channels, arch.embed_dim, arch.block, arch.width_ratio,
                         arch.ocbe_depth)
        tau = float(arch.embed_dim) if cram_tau == "dim" else math.sqrt(arch.embed_dim)
        self.cram = (CRAM(arch.embed_dim, num_centers, tau=tau, fused=self.fused,
                          residual_ratio=residual_ratio) if structure == "snl" else None)
        self.decoder = Decoder(arch.channels, arch.embed_dim, arch.block, arch.width_ratio,
                               arch.decoder_depths)

    @property
    def fused(self) -> bool:
        """Whether the ops are snl_kernels' (True) or the reference (False); assignable."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        if self.cram is not None:
            self.cram.fused = self._fused

    @property
    def precision(self) -> str:
        """"fp32" or "bf16" (see the class doc); assignable."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        _check_choice("precision", value, PRECISIONS)
        self._precision = value

    @property
    def normalization(self) -> Normalization:
        """The teacher's input normalisation: ``(images - mean) / std`` on [0, 1] RGB."""
        return self.arch.normalization

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student side's parameters (OCBE, CRAM, decoder): what the optimizer gets."""
        for part in (self.ocbe, self.cram, self.decoder):
            if part is not None:
                yield from part.parameters()

    def check_images(self, images: object) -> Tensor:
        """Check that ``images`` is a (B, 3, H, W) floating tensor with H, W multiples of 32."""
        if not isinstance(images, Tensor):
            raise TypeError(f"SNL: images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"SNL: images must be a floating tensor, got {images.dtype}")
        shape = tuple(images.shape)
        c = self.arch.in_chans
        if images.dim() != 4:
            raise ValueError(
                f"SNL: images must be a 4-D tensor (B, {c}, H, W), got shape {shape}"
                + ("; add a batch dimension with images[None]" if images.dim() == 3 else "")
            )
        if shape[1] != c:
            raise ValueError(
                f"SNL: images must have {c} channels for backbone {self.arch.backbone!r}, "
                f"got {shape[1]} (shape {shape})"
            )
        if shape[0] == 0 or shape[2] % MULTIPLE or shape[3] % MULTIPLE or 0 in shape[2:]:
            raise ValueError(
                f"SNL: images' batch must be non-empty and height and width positive "
                f"multiples of {MULTIPLE}, got shape {shape}"
            )
        return images

    def forward(self, images: Tensor) -> Features:
        """Teacher and student features of a batch.

        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of 32.

        Returns:
            ``Features(teachers, students, cram)``.
        """
        self.check_images(images)
        # fp32 leaves autocast as the caller set it (an enabled=False context would switch
        # off a caller's own autocast)
        bf16 = self.precision == "bf16"
        with (torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16
              else contextlib.nullcontext()):
            with torch.no_grad():
                teachers = self.teacher(images)
            embedding = self.ocbe(teachers)
            cram_out = None
            if self.cram is not None:
                embedding, cram_out = self.cram(embedding)
            return Features(teachers, self.decoder(embedding), cram_out)

    def loss(self, images: Tensor) -> dict[str, Tensor]:
        """Every loss term and ``total`` (docs/model.md §1) on a batch.

        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of 32.

        Returns:
            structure "snl": ``rd``, ``channel``, ``spatial``, ``intra``, ``inter``,
            ``compact`` (unweighted, ``compact`` after ``compact_norm``; terms with weight 0
            left out) and ``total`` (weighted sum); structure "rd": ``rd`` and ``total``.
            0-dim float32 tensors.
        """
        features = self(images)
        teachers, students = common_dtype(features.teachers, features.students)
        backend = op_backend(self.fused)
        with full_precision(images.device.type):
            if self.structure == "rd":
                return rd_loss(teachers, students, backend)
            compact = features.cram.compact if features.cram is not None else None
            if compact is not None and self.compact_norm == "dim":
                compact = compact / self.arch.embed_dim
            return snl_loss(teachers, students, compact, self.loss_weights,
                            self.intra_distance, self.inter_distance, backend)

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Anomaly scores and maps at the input size (call ``model.eval()`` first).

        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of 32.

        Returns:
            ``scores`` (B,) and ``maps`` (B, 1, H, W), float32: the sum over levels of the
            upsampled per-pixel cosine distances, blurred by ``sigma``; a score is its map's
            max.
        """
        features = self(images)
        teachers, students = common_dtype(features.teachers, features.students)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        with full_precision(images.device.type):
            result = snl_kernels.anomaly_map(teachers, students, size, self.sigma, self.map_mode,
                                             backend=op_backend(self.fused))
        return result.scores, result.maps

    def extra_repr(self) -> str:
        return (f"backbone={self.arch.backbone!r}, structure={self.structure!r}, "
                f"fused={self.fused}, precision={self.precision!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
