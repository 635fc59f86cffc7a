"""The shape of an SNL model, derived from its timm backbone.

Everything the student side needs to mirror the teacher is read from the backbone once,
from a parameter-free copy built on the ``meta`` device:

- the three teacher levels are the last feature stages at strides 4, 8 and 16
  (``layer1..3`` for ResNets; the stride 4/8/16 stages of EfficientNets: 24, 40 and 112
  channels for ``tf_efficientnet_lite0``);
- ResNets are mirrored as RD4AD does: the one-class bottleneck (OCBE) and the decoder use
  the teacher's residual block type (basic or bottleneck) and width ratio, OCBE has as many
  blocks as the teacher's ``layer4`` and the decoder's stages (coarse to fine) have as many
  as the teacher's ``layer1``, ``layer2``, ``layer3``; the embedding has ``2 * C_3``
  channels (2048 for WRN50 / ResNet-50, 512 for ResNet-18: RD4AD's sizes);
- any other backbone gets bottleneck blocks of width ratio 1/2, two OCBE blocks, two per
  decoder stage and also ``2 * C_3`` embedding channels (224 for EfficientNet-Lite0);
- the input normalisation is the backbone's pretrained one (ImageNet mean/std for the
  ResNets, 0.5/0.5 for EfficientNet-Lite0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

STRIDES = (4, 8, 16)


class Normalization(NamedTuple):
    """Per-channel input normalisation: ``(images - mean) / std`` on [0, 1] RGB images."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Architecture:
    """Sizes of the teacher and of the student side for one backbone."""

    backbone: str  #: timm model name, optionally with a pretrained tag ("resnet18.tv_in1k")
    out_indices: tuple[int, int, int]  #: timm feature indices of the strides 4, 8, 16
    channels: tuple[int, int, int]  #: C_1, C_2, C_3 of the teacher levels
    in_chans: int  #: image channels the teacher takes
    block: str  #: "basic" or "bottleneck" residual blocks on the student side
    width_ratio: float  #: bottleneck middle width / block output width
    embed_dim: int  #: D, channels of the OCBE embedding (at stride 32)
    ocbe_depth: int  #: residual blocks in OCBE
    decoder_depths: tuple[int, int, int]  #: blocks per decoder stage, coarse to fine
    normalization: Normalization

    @property
    def arch_name(self) -> str:
        """The backbone name without its pretrained tag."""
        return self.backbone.split(".", 1)[0]


def import_timm():
    """Import timm, or raise an ImportError that says how to get it."""
    try:
        import timm
    except Exception as exc:  # a broken torchvision raises RuntimeError, not ImportError
        raise ImportError(
            "the SNL model needs timm for its teacher backbone (pip install timm; timm needs "
            f"a torchvision built for the installed torch): {type(exc).__name__}: {exc}"
        ) from exc
    return timm


def meta_backbone(backbone: str) -> torch.nn.Module:
    """The full timm classifier for ``backbone``, built on the meta device (no memory)."""
    timm = import_timm()
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone must be a timm model name, got {backbone!r}")
    try:
        with torch.device("meta"):
            return timm.create_model(backbone, pretrained=False)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            raise ValueError(
                f"backbone must be a timm model name (e.g. 'wide_resnet50_2', 'resnet18', "
                f"'tf_efficientnet_lite0'), got {backbone!r}: {exc}"
            ) from exc
        raise


def _level_indices(backbone: str, feature_info: list[dict]) -> tuple[int, int, int]:
    indices = []
    for stride in STRIDES:
        found = [i for i, f in enumerate(feature_info) if f["reduction"] == stride]
        if not found:
            levels = [(f["module"], f["reduction"]) for f in feature_info]
            raise ValueError(
                f"backbone {backbone!r} has no feature level at stride {stride}; SNL needs "
                f"levels at strides {STRIDES}, its levels (module, stride) are {levels}"
            )
        indices.append(found[-1])  # the deepest stage at that stride
    return tuple(indices)  # type: ignore[return-value]


def architecture(backbone: str) -> Architecture:
    """Derive the teacher levels and the student's sizes from a timm backbone.

    Args:
        backbone: a timm model name with feature levels at strides 4, 8 and 16.

    Returns:
        The :class:`Architecture`.

    Raises:
        ValueError: an unknown model name, or a model without those three levels.
        ImportError: timm cannot be imported.
    """
    full = meta_backbone(backbone)
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    info = list(full.feature_info)
    out_indices = _level_indices(backbone, info)
    channels = tuple(int(info[i]["num_chs"]) for i in out_indices)
    cfg = full.pretrained_cfg
    normalization = Normalization(tuple(cfg["mean"]), tuple(cfg["std"]))
    in_chans = int(cfg.get("input_size", (3,))[0])
    block, width_ratio, ocbe_depth, decoder_depths = "bottleneck", 0.5, 2, (2, 2, 2)
    if isinstance(full, ResNet):
        first = full.layer3[0]
        if isinstance(first, Bottleneck):
            block = "bottleneck"
            width_ratio = first.conv1.out_channels / first.conv3.out_channels
        elif isinstance(first, BasicBlock):
            block, width_ratio = "basic", 1.0
        ocbe_depth = len(full.layer4)
        decoder_depths = (len(full.layer1), len(full.layer2), len(full.layer3))
    return Architecture(
        backbone=backbone,
        out_indices=out_indices,
        channels=channels,  # type: ignore[arg-type]
        in_chans=in_chans,
        block=block,
        width_ratio=width_ratio,
        embed_dim=2 * channels[2],
        ocbe_depth=ocbe_depth,
        decoder_depths=decoder_depths,
        normalization=normalization,  # type: ignore[arg-type]
    )


def normalization(backbone: str) -> Normalization:
    """The input normalisation (mean, std) of a backbone's pretrained weights.

    Args:
        backbone: a timm model name.

    Returns:
        ``Normalization(mean, std)``, per RGB channel, for images scaled to [0, 1].
    """
    cfg = meta_backbone(backbone).pretrained_cfg
    return Normalization(tuple(cfg["mean"]), tuple(cfg["std"]))  # type: ignore[arg-type]
