"""SNL as an anomalib 2.x model: train, test, predict and export it with anomalib's ``Engine``.

::

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from snl.integrations.anomalib import SNL

    model = SNL(backbone="wide_resnet50_2", image_size=(256, 256))  # structure="rd": RD4AD
    engine = Engine(max_epochs=200)
    engine.fit(model, datamodule=MVTecAD(category="bottle"))
    engine.test(model, datamodule=MVTecAD(category="bottle"))

The module wraps :class:`snl.SNL` (``self.model``) the way anomalib's own
``ReverseDistillation`` wraps its torch model:

- the default pre-processor resizes to ``image_size`` and normalises with the *backbone's*
  pretrained mean and std (:func:`snl.normalization`: ImageNet's for the ResNets, 0.5 for
  EfficientNet-Lite0), not always ImageNet's as anomalib's default does;
- ``training_step`` minimises ``self.model.loss(batch.image)["total"]`` (every term is
  logged as ``train_<term>``); the optimizer is Adam on ``self.model.trainable_parameters()``
  (the student side) with ``snl train``'s settings: lr 0.005, betas (0.5, 0.999), no weight
  decay. The teacher is frozen and stays in eval mode whatever Lightning switches
  (:class:`snl.teacher.Teacher`), which is why Lightning warns "Found N module(s) in eval
  mode at the start of training": that is the teacher, on purpose;
- validation, test and predict steps put ``self.model.predict``'s scores (B,) and maps
  (B, 1, H, W) into ``pred_score`` and ``anomaly_map``; anomalib's post-processor then
  normalises them and its evaluator computes the metrics;
- validation also runs the self-check (:mod:`snl.selfcheck`): each normal validation image
  (``gt_label`` 0; every image when the batch has no labels) gets a cut-paste probe, a
  rectangle of another normal image of its batch pasted at another place
  (:func:`snl.selfcheck.cutpaste_batch`), and at the end of the epoch the image AUROC of the
  normal images against their probes is logged as ``self_check`` (kept in
  ``self.self_check``); below :data:`snl.selfcheck.FLAG_BELOW` a ``UserWarning`` says the
  student may reproduce anomalies. ``self_check=False`` switches it off;
- ``forward`` (what anomalib's inferencers and exporters run) is pre-processor ->
  ``predict`` -> post-processor; ONNX and OpenVINO export trace it with the plain-PyTorch
  reference ops (``fused=False``: the same numbers, and no custom ops in the graph).

anomalib is imported here, when this module is imported, never by ``import snl``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import snl
from snl import selfcheck
from snl.config import normalization

_INSTALL_HINT = 'pip install "snl-kernels[anomalib]"'

try:
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.metrics import Evaluator
    from anomalib.models.components import AnomalibModule
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from anomalib.visualization import Visualizer
    from torchvision.transforms.v2 import Compose, Normalize, Resize
except Exception as exc:  # not installed (ImportError), or a broken install (RuntimeError...)
    raise ImportError(
        f"snl.integrations.anomalib needs anomalib 2.x (with lightning and torchvision): "
        f"{_INSTALL_HINT} ({type(exc).__name__}: {exc})"
    ) from exc

__all__ = ["SNL"]

#: ONNX opset of the export: the lowest that torch's dynamo exporter implements.
ONNX_OPSET = 18

#: Height and width of the images must be multiples of this (the embedding is at stride 32).
MULTIPLE = 32


def _image_size(image_size: object) -> tuple[int, int]:
    """``image_size`` as (H, W): an int or a pair of positive multiples of 32."""
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    try:
        h, w = size  # type: ignore[misc]
    except (TypeError, ValueError):
        h = w = None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % MULTIPLE == 0
               for v in (h, w)):
        raise ValueError(
            f"image_size must be an int or a (height, width) pair of positive multiples of "
            f"{MULTIPLE} (SNL's embedding is at stride {MULTIPLE}), got {image_size!r}")
    return int(h), int(w)  # type: ignore[arg-type]


class SNL(AnomalibModule):
    """SNL (or its RD4AD baseline) as an anomalib ``AnomalibModule``.

    Args:
        backbone: timm teacher backbone (see :class:`snl.SNL`); also decides the default
            pre-processor's normalisation.
        pretrained: load the teacher's ImageNet weights (False: a random teacher, for tests).
        weights: a local state dict file for the teacher; takes precedence over
            ``pretrained``.
        structure: "snl" (CRAM and the structural losses) or "rd" (RD4AD's baseline).
        num_centers: K, CRAM's centres.
        fused: snl_kernels' fused ops (True) or the plain-PyTorch reference (False).
        image_size: (H, W) (or one int) the default pre-processor resizes to; multiples of
            32. Ignored when a ``pre_processor`` is passed: that one decides the size.
        sigma: Gaussian blur of the anomaly maps, in input pixels.
        lr, betas, weight_decay: Adam's settings (``snl train``'s defaults).
        pre_processor, post_processor, evaluator, visualizer: anomalib's components: an
            instance, True for the default, False for none.
        self_check: run the self-check on the validation images and log ``self_check``.
        **kwargs: any other :class:`snl.SNL` keyword argument (``w_ch``, ``w_sp``,
            ``w_intra``, ``w_inter``, ``w_c``, ``w_rd``, ``compact_norm``,
            ``residual_ratio``, ``cram_tau``, ``intra_distance``, ``inter_distance``,
            ``map_mode``).

    Raises:
        ValueError: a bad ``image_size`` or any :class:`snl.SNL` argument out of range.
        snl.WeightsUnavailableError: pretrained weights asked for and not to be had.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        structure: str = "snl",
        num_centers: int = 16,
        fused: bool = True,
        image_size: int | Sequence[int] = (256, 256),
        sigma: float = 4.0,
        lr: float = 0.005,
        betas: Sequence[float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        self_check: bool = True,
        **kwargs: Any,
    ) -> None:
        size = _image_size(image_size)
        if pre_processor is True:  # anomalib's default knows neither the size nor the backbone
            pre_processor = self.configure_pre_processor(size, backbone)
        super().__init__(pre_processor=pre_processor, post_processor=post_processor,
                         evaluator=evaluator, visualizer=visualizer)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.run_self_check = bool(self_check)
        #: the last validation epoch's self-check figure (NaN before any, or without normal
        #: validation images)
        self.self_check = math.nan
        self._check_scores: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.model = snl.SNL(backbone=backbone, pretrained=pretrained, weights=weights,
                             fused=fused, structure=structure, num_centers=num_centers,
                             sigma=sigma, **kwargs)

    @staticmethod
    def configure_pre_processor(image_size: int | Sequence[int] | None = None,
                                backbone: str = "wide_resnet50_2") -> PreProcessor:
        """Resize to ``image_size`` (default 256 x 256) and normalise with ``backbone``'s
        pretrained mean and std (:func:`snl.normalization`)."""
        size = _image_size((256, 256) if image_size is None else image_size)
        norm = normalization(backbone)
        return PreProcessor(transform=Compose([
            Resize(size, antialias=True),
            Normalize(mean=list(norm.mean), std=list(norm.std)),
        ]))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs) -> SNL:
        """anomalib's loader; the teacher's weights come from the checkpoint, so none are
        fetched (``pretrained=False``, ``weights=None`` unless given)."""
        kwargs.setdefault("pretrained", False)
        kwargs.setdefault("weights", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ training

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the student side (OCBE, CRAM, decoder); the teacher stays frozen."""
        return torch.optim.Adam(self.model.trainable_parameters(), lr=self.lr, betas=self.betas,
                                weight_decay=self.weight_decay)

    def training_step(self, batch: Batch, *args, **kwargs) -> dict[str, torch.Tensor]:
        """``self.model.loss`` on the pre-processed images; logs every term."""
        del args, kwargs
        losses = self.model.loss(batch.image)
        size = int(batch.image.shape[0])
        self.log("train_loss", losses["total"].detach(), on_step=True, on_epoch=True,
                 prog_bar=True, logger=True, batch_size=size)
        terms = {f"train_{k}": v.detach() for k, v in losses.items() if k != "total"}
        if terms:
            self.log_dict(terms, on_step=False, on_epoch=True, logger=True, batch_size=size)
        return {"loss": losses["total"]}

    # ------------------------------------------------------------------ inference

    def _predict_batch(self, batch: Batch) -> Batch:
        scores, maps = self.model.predict(batch.image)  # (B,), (B, 1, H, W)
        return batch.update(pred_score=scores, anomaly_map=maps)

    def validation_step(self, batch: Batch, *args, **kwargs) -> Batch:
        """Scores and maps of the batch (the post-processor collects its statistics); with
        the self-check on, the scores of its normal images' cut-paste probes too."""
        del args, kwargs
        batch = self._predict_batch(batch)
        if self.run_self_check:
            normal = (torch.ones(len(batch.image), dtype=torch.bool) if batch.gt_label is None
                      else batch.gt_label.flatten().cpu() == 0)
            if normal.any():
                offset = sum(len(s) for s in self._check_scores[0])
                probes, _ = selfcheck.cutpaste_batch(batch.image[normal.to(batch.image.device)],
                                                     offset=offset)
                probe_scores, _ = self.model.predict(probes)
                self._check_scores[0].append(batch.pred_score.flatten()[
                    normal.to(batch.pred_score.device)].detach().float().cpu())
                self._check_scores[1].append(probe_scores.detach().float().cpu())
        return batch

    def on_validation_epoch_start(self) -> None:
        """Forget the previous epoch's self-check scores."""
        self._check_scores = ([], [])

    def on_validation_epoch_end(self) -> None:
        """Log the self-check (``self_check``) and warn when it is below the flag."""
        normals, probes = self._check_scores
        if not self.run_self_check or not normals:
            return
        self.self_check = selfcheck.probe_auroc(torch.cat(normals).numpy(),
                                                torch.cat(probes).numpy())
        self.log("self_check", self.self_check, prog_bar=True, logger=True)
        if self.self_check < selfcheck.FLAG_BELOW:
            warnings.warn(
                f"self-check: probe image AUROC {100 * self.self_check:.1f} < "
                f"{100 * selfcheck.FLAG_BELOW:.1f} on the validation images: the student may "
                "reproduce anomalies instead of flagging them; retrain with another seed",
                UserWarning, stacklevel=1)

    def test_step(self, batch: Batch, *args, **kwargs) -> Batch:
        """Scores and maps of the batch (the evaluator computes the metrics)."""
        del args, kwargs
        return self._predict_batch(batch)

    def predict_step(self, batch: Batch, *args, **kwargs) -> Batch:
        """Scores and maps of the batch (post-processed by anomalib's callbacks)."""
        del args, kwargs
        return self._predict_batch(batch)

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """Raw images (B, 3, H, W) in [0, 1] -> pre-processor -> scores and maps ->
        post-processor: what anomalib's exporters and inferencers run."""
        del args, kwargs
        images = self.pre_processor(batch) if self.pre_processor else batch
        scores, maps = self.model.predict(images)
        predictions = InferenceBatch(pred_score=scores, anomaly_map=maps)
        return self.post_processor(predictions) if self.post_processor else predictions

    # ------------------------------------------------------------------ export

    @contextlib.contextmanager
    def reference_ops(self) -> Iterator[None]:
        """Run the plain-PyTorch reference ops (``fused=False``) inside the block."""
        fused = self.model.fused
        self.model.fused = False
        try:
            yield
        finally:
            self.model.fused = fused

    def to_onnx(self, *args, **kwargs):
        """anomalib's ONNX export, traced with the reference ops (see :meth:`reference_ops`).

        anomalib 2.7 exports with ``torch.onnx.export(dynamo=True)``, which needs
        ``onnxscript``. The opset defaults to 18, the lowest the dynamo exporter writes
        (anomalib asks for 14, and the down-conversion fails with a logged traceback, keeping
        18 anyway). OpenVINO export goes through this method too.
        """
        kwargs.setdefault("opset_version", ONNX_OPSET)
        with self.reference_ops():
            return super().to_onnx(*args, **kwargs)

    # ------------------------------------------------------------------ anomalib's hooks

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """As anomalib's ReverseDistillation: no gradient clipping, no sanity validation."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
