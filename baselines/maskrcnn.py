"""torchvision Mask R-CNN behind ISTR's model interface, so that one data pipeline, one training loop and
one COCOeval serve both (docs/design.md, "Model" and "Baselines").

The backbone is ISTR's own (``istr.models.backbone.Backbone``: the same ResNet + FPN, freezing, norm and
weight loading), so the two detectors differ only in what follows the FPN. The other differences from a
stock ``maskrcnn_resnet50_fpn`` are all about sharing ISTR's pipeline:
- our transforms resize, so the internal ``GeneralizedRCNNTransform`` only normalises (with the paper's
  pixel mean/std in 0..255 units, the same as ISTR) and pads to ``size_divisibility``;
- labels are 0..C-1 outside and 1..C inside (0 is torchvision's background);
- anchor sizes scale with the test resolution (x min_size_test / 800): identical at paper scale, and at
  CPU scale the anchors keep the same size relative to the image;
- ``model.head.pooler_impl`` picks the RoIAlign of both detectors: "matmul" (the smoke preset) swaps
  torchvision's single-threaded CPU backward for ISTR's parity-tested one, keeping torchvision's level rule
  and aligned=False, so a train-step comparison measures the two heads, not two RoIAlign kernels.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _setup_scales

from istr.config import Config, ModelConfig
from istr.models.backbone import Backbone
from istr.models.pooler import pool_by_level, rois_from_boxes
from istr.models.roi_align_matmul import roi_align_matmul

# torchvision's defaults for 800-pixel images: one size per FPN level p2..p6.
_ANCHOR_SIZES_AT_800 = (32, 64, 128, 256, 512)


class NormalizeOnlyTransform(GeneralizedRCNNTransform):
    """Normalise and pad, never resize: the dataset transforms already produced the test/train size."""

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        return image, target


class MaskRCNNBaseline(MaskRCNN):
    """Mask R-CNN speaking ISTR's interface.

    ``model(images, targets)`` in training -> dict of scalar losses; in eval ``model(images)`` -> list (per
    image) of ``boxes [K,4], labels [K] in 0..C-1, scores [K], masks [K,1,H,W] in [0,1]``, K <= 100;
    ``all_stages=True`` wraps that in a one-stage list; ``output_sizes`` rescales boxes and masks.
    ``images`` are RGB float tensors [3,H,W] in 0..255.
    """

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None,
                all_stages: bool = False, output_sizes: Optional[list[tuple[int, int]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("MaskRCNNBaseline: targets are required in training mode")
            targets = [_to_torchvision_target(t) for t in targets]
        input_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return OrderedDict(**detector_losses, **proposal_losses)
        detections = self.transform.postprocess(detections, batch.image_sizes, output_sizes or input_sizes)
        detections = [_from_torchvision_detections(d) for d in detections]
        return [detections] if all_stages else detections


class MatmulMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (its level mapper, aligned=False) computed with ``roi_align_matmul``.

    forward(features {name: [B, C, H_l, W_l]}, boxes [per image [N_i, 4] xyxy], image_shapes) -> [sum N_i, C, S, S]
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = rois_from_boxes([b.detach().float() for b in boxes])
        return pool_by_level(roi_align_matmul, [f.float() for f in features], self.scales, rois, self.map_levels(boxes),
                             self.output_size[0], self.sampling_ratio, aligned=False)


def _to_torchvision_target(target: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"boxes": target["boxes"], "labels": target["labels"] + 1, "masks": target["masks"].to(torch.uint8)}


def _from_torchvision_detections(det: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"boxes": det["boxes"], "labels": det["labels"] - 1, "scores": det["scores"], "masks": det["masks"]}


def build_maskrcnn(cfg: ModelConfig, score_thresh: float = 0.05, anchor_scale: float = 1.0) -> MaskRCNNBaseline:
    """Mask R-CNN on a ResNet-FPN from ``cfg.backbone`` with ``cfg.num_classes`` + 1 (background) classes.

    ``score_thresh`` is torchvision's ``box_score_thresh``: 0.05 is its default (and detectron2's);
    0.0 forces ``cfg.detections_per_image`` detections per image, as ISTR always returns.
    ``anchor_scale`` multiplies torchvision's anchor sizes (use min_size_test / 800).
    """
    sizes = tuple((max(1, round(s * anchor_scale)),) for s in _ANCHOR_SIZES_AT_800)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    levels = ["p2", "p3", "p4", "p5"]  # Backbone's names; its p6 ("pool") feeds the RPN only, as in torchvision
    pooler = MatmulMultiScaleRoIAlign if cfg.head.pooler_impl == "matmul" else MultiScaleRoIAlign
    model = MaskRCNNBaseline(
        Backbone(cfg.backbone),
        num_classes=cfg.num_classes + 1,
        rpn_anchor_generator=anchors,
        box_roi_pool=pooler(levels, output_size=7, sampling_ratio=2),
        mask_roi_pool=pooler(levels, output_size=14, sampling_ratio=2),
        box_score_thresh=score_thresh,
        box_detections_per_img=cfg.detections_per_image,
    )
    model.transform = NormalizeOnlyTransform(
        min_size=1, max_size=1, image_mean=list(cfg.pixel_mean), image_std=list(cfg.pixel_std),
        size_divisible=cfg.size_divisibility,
    )
    return model


def train_and_evaluate(cfg: Config, output_dir: str | Path) -> dict[str, Any]:
    """The ``maskrcnn`` runner: ``istr.engine.job.train_and_evaluate`` with the Mask R-CNN builder.

    Same data, pretrained backbone, training loop, evaluation and files as the ISTR job; ``metrics.json`` has
    one stage ("1"), equal to "final".
    """
    from istr.engine import job

    return job.train_and_evaluate(cfg, output_dir, build=build, all_stages=True)


def build(cfg: Config, train_ds: Any, log: Any) -> MaskRCNN:
    """The runner's model factory (``istr.engine.job.ModelFactory``): Mask R-CNN with anchors scaled to the test size."""
    return build_maskrcnn(cfg.model, anchor_scale=cfg.data.min_size_test / 800)
