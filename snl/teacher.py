"""The frozen teacher: a timm backbone returning the feature levels at strides 4, 8 and 16."""

from __future__ import annotations

import os

from torch import Tensor, nn

from . import weights as sources
from .config import Architecture, import_timm, meta_backbone


class Teacher(nn.Module):
    """A frozen timm feature extractor, always in eval mode.

    Its parameters never require grad, and ``train()`` leaves it in eval mode, so its
    BatchNorm statistics never change, whatever the model around it does.

    Args:
        features: timm ``features_only`` model returning the three levels.
    """

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode: the teacher is a fixed ImageNet feature extractor."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Features (B, C_k, H / s_k, W / s_k) for the strides s_k = 4, 8, 16."""
        return list(self.features(images))


def build_teacher(arch: Architecture, pretrained: bool,
                  weights: str | os.PathLike | None) -> Teacher:
    """Create the teacher and load its weights (see :mod:`snl.weights` for the sources).

    Args:
        arch: the model's architecture.
        pretrained: load ImageNet weights (ignored when ``weights`` is given).
        weights: a local state dict file, or None.

    Raises:
        WeightsUnavailableError: ``pretrained=True`` and no source has the weights.
        FileNotFoundError, ValueError: a ``weights`` file that is missing or does not fit.
    """
    timm = import_timm()
    kwargs = dict(features_only=True, out_indices=arch.out_indices)
    if weights is not None:
        features = timm.create_model(arch.backbone, pretrained=False, **kwargs)
        sources.load_teacher_weights(features, meta_backbone(arch.backbone),
                               sources.read_state_dict(weights), repr(str(weights)))
        return Teacher(features)
    if not pretrained:
        return Teacher(timm.create_model(arch.backbone, pretrained=False, **kwargs))
    packaged = sources.packaged_weights_file(arch.arch_name)
    if packaged is not None:
        features = timm.create_model(arch.backbone, pretrained=False, **kwargs)
        sources.load_teacher_weights(features, meta_backbone(arch.backbone),
                               sources.read_state_dict(packaged), str(packaged))
        return Teacher(features)
    cfg = timm.models.get_pretrained_cfg(arch.backbone)
    cached = sources.hub_file_in_cache(cfg)
    if cached is not None:
        return Teacher(timm.create_model(
            arch.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=cached), **kwargs
        ))
    url = sources.hub_url(cfg) if cfg is not None else None
    if url is None:
        raise sources.WeightsUnavailableError(
            sources.unavailable_message(arch.backbone, "timm has no pretrained weights for it"))
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in sources.TRUE:
        raise sources.WeightsUnavailableError(sources.unavailable_message(
            arch.backbone, "HF_HUB_OFFLINE is set and they are not in the local cache"))
    timeout = sources.hub_timeout()
    if not sources.reachable(url, timeout):
        raise sources.WeightsUnavailableError(sources.unavailable_message(
            arch.backbone,
            f"they are not in the local cache and {url} did not answer within {timeout:g} s "
            "(SNL_HUB_TIMEOUT sets the wait)",
        ))
    try:
        return Teacher(timm.create_model(arch.backbone, pretrained=True, **kwargs))
    except (OSError, RuntimeError) as exc:
        raise sources.WeightsUnavailableError(sources.unavailable_message(
            arch.backbone, f"timm could not download them ({type(exc).__name__}: {exc})"
        )) from exc

