"""The set loss: focal class, L1 + GIoU box, embedding L2 + dice mask, summed over stages (deep supervision)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, roi_align, sigmoid_focal_loss

from istr.config import LossConfig, MaskConfig
from istr.models.mask_coding import MaskCodec, soften
from istr.models.matcher import HungarianMatcher, ordered_boxes


def crop_masks(masks: Tensor, boxes: Tensor, resolution: int) -> Tensor:
    """Binary GT crops: full-image masks [N, H, W] resampled inside boxes [N, 4] (RoIAlign aligned=True,
    adaptive sampling, as detectron2's BitMasks.crop_and_resize), thresholded at 0.5 -> [N, R, R] float {0, 1}."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, resolution, resolution), dtype=torch.float32)
    index = torch.arange(masks.shape[0], device=masks.device, dtype=torch.float32)[:, None]
    rois = torch.cat([index, boxes.float()], dim=1)
    crops = roi_align(masks[:, None].float(), rois, resolution, 1.0, 0, True)[:, 0]
    return (crops >= 0.5).float()


def dice_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """Per instance 1 - 2 sum(pt) / (sum p^2 + sum t^2 + 1e-5); probs, targets [M, R*R] -> [M]."""
    num = 2 * (probs * targets).sum(1)
    den = (probs * probs).sum(1) + (targets * targets).sum(1) + 1e-5
    return 1 - num / den


class SetCriterion(nn.Module):
    """Weighted losses of every stage (``loss_class_s1`` ...) after Hungarian matching per stage.

    forward(stage_outputs, targets, image_sizes) with stage_outputs the head's list of dicts, targets as in
    docs/design.md (boxes, labels, full-image masks), image_sizes [(h, w)] of the un-padded inputs.
    Every sum is divided by the number of GT boxes (all-reduced mean over processes, at least 1).
    """

    def __init__(self, cfg: LossConfig, mask_cfg: MaskConfig, matcher: HungarianMatcher, codec: MaskCodec,
                 num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.mask_cfg = mask_cfg
        self.matcher = matcher
        self.codec = codec
        self.num_classes = num_classes

    def prepare_targets(self, targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Adds ``image_size_xyxy [4]`` and the binary crops ``masks [N, R, R]``."""
        prepared = []
        for target, (h, w) in zip(targets, image_sizes):
            boxes = target["boxes"].float()
            prepared.append({
                "labels": target["labels"].long(),
                "boxes": boxes,
                "image_size_xyxy": boxes.new_tensor([w, h, w, h]),
                "masks": crop_masks(target["masks"], boxes, self.mask_cfg.resolution),
            })
        return prepared

    def with_soft_embeddings(self, targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Encoded GT embeddings from freshly drawn soft labels (a new draw at every call, as the official code)."""
        m = self.mask_cfg
        return [{**t, "mask_emb": self.codec.encode(soften(t["masks"], m.soft_r_min, m.soft_r_max))} for t in targets]

    def forward(self, stage_outputs: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]],
                image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        prepared = self.prepare_targets(targets, image_sizes)
        num_boxes = self._num_boxes(prepared, stage_outputs[0]["pred_logits"].device)
        stages = range(len(stage_outputs)) if self.cfg.deep_supervision else [len(stage_outputs) - 1]
        losses = {}
        for k in stages:
            indices = self.matcher(stage_outputs[k], self.with_soft_embeddings(prepared))
            for name, value in self.stage_losses(stage_outputs[k], self.with_soft_embeddings(prepared), indices, num_boxes).items():
                losses[f"{name}_s{k + 1}"] = value
        return losses

    def stage_losses(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]],
                     indices: list[tuple[Tensor, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        """Weighted losses of one stage given the matching."""
        c = self.cfg
        logits = outputs["pred_logits"].float()
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)

        def matched(key: str) -> Tensor:
            return torch.cat([t[key][gt.to(device)] for t, (_, gt) in zip(targets, indices)])

        gt_labels = matched("labels")
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, gt_labels] = 1.0
        losses = {"loss_class": c.weight_class * sigmoid_focal_loss(
            logits, onehot, c.focal_alpha, c.focal_gamma, reduction="sum") / num_boxes}

        scale = torch.cat([t["image_size_xyxy"].expand(len(gt), 4) for t, (_, gt) in zip(targets, indices)])
        pred_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()
        gt_boxes = matched("boxes")
        losses["loss_l1"] = c.weight_l1 * (pred_boxes / scale - gt_boxes / scale).abs().sum() / num_boxes
        losses["loss_giou"] = c.weight_giou * generalized_box_iou_loss(
            ordered_boxes(pred_boxes), gt_boxes, reduction="sum") / num_boxes

        pred_emb = outputs["pred_masks"][batch_idx, src_idx].float()
        if c.mask_loss in ("l2", "l2+dice"):
            l2 = nn.functional.mse_loss(pred_emb, matched("mask_emb"), reduction="sum")
            losses["loss_mask_l2"] = c.weight_mask * l2 / num_boxes / pred_emb.shape[1]
        if c.mask_loss in ("dice", "l2+dice"):
            probs = self.codec.decode_logits(pred_emb).sigmoid()
            losses["loss_dice"] = c.weight_mask * dice_loss(probs, matched("masks").flatten(1)).sum() / num_boxes
        return losses

    @staticmethod
    def _num_boxes(targets: Sequence[dict[str, Tensor]], device: torch.device) -> float:
        """GT boxes in the batch, averaged over processes when distributed, at least 1."""
        num = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        return max(num.item(), 1.0)
