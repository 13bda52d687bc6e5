"""Hungarian matching of predictions to ground truth: cost = w_class*class + w_l1*L1 + w_giou*(-GIoU) + w_mask*mask."""
from __future__ import annotations

from typing import Optional

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from istr.config import MatcherConfig
from istr.models.mask_coding import MaskCodec


def ordered_boxes(boxes: Tensor) -> Tensor:
    """Swap inverted corners so that x1 <= x2, y1 <= y2 (a degenerate predicted box must not break GIoU)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)], -1)


def class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal-style cost [P, N]: alpha (1-p)^g (-log p) - (1-alpha) p^g (-log(1-p)) at each GT's class."""
    prob = logits.float().sigmoid()[:, labels]
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return pos - neg


def l1_cost(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """[P, N] L1 distance of (image-size normalised) xyxy boxes."""
    return torch.cdist(pred_boxes.float(), gt_boxes.float(), p=1)


def giou_cost(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """[P, N] -GIoU; a pair with zero union (both boxes empty) costs the worst value, 1."""
    giou = generalized_box_iou(ordered_boxes(pred_boxes.float()), gt_boxes.float())
    return -giou.nan_to_num(nan=-1.0)


def cosine_mask_cost(pred_emb: Tensor, gt_emb: Tensor) -> Tensor:
    """[P, N] -(cos + 1) / 2 between embeddings (paper Eq. 7 without its weight)."""
    cos = nn.functional.normalize(pred_emb.float(), dim=1) @ nn.functional.normalize(gt_emb.float(), dim=1).T
    return -(cos + 1) / 2


def l1_mask_cost(pred_emb: Tensor, gt_emb: Tensor) -> Tensor:
    """[P, N] mean absolute difference of embeddings (L1 / l, so the scale does not grow with l)."""
    return torch.cdist(pred_emb.float(), gt_emb.float(), p=1) / pred_emb.shape[1]


def dice_mask_cost(pred_probs: Tensor, gt_masks: Tensor) -> Tensor:
    """[P, N] dice loss 1 - 2 sum(pt) / (sum p^2 + sum t^2 + 1e-5) between decoded masks [P, R*R] and GT [N, R*R]."""
    p, t = pred_probs.float().flatten(1), gt_masks.float().flatten(1)
    num = 2 * p @ t.T
    den = (p * p).sum(1)[:, None] + (t * t).sum(1)[None, :] + 1e-5
    return 1 - num / den


class HungarianMatcher(nn.Module):
    """One-to-one assignment per image (scipy linear_sum_assignment).

    forward(outputs, targets) with
      outputs: ``pred_logits [B, P, C]``, ``pred_boxes [B, P, 4]`` xyxy input pixels, ``pred_masks [B, P, l]``;
      targets: per image ``labels [N]``, ``boxes [N, 4]`` xyxy input pixels, ``image_size_xyxy [4]`` (w, h, w, h),
      ``mask_emb [N, l]`` (encoded soft GT, for the cosine/L1 costs), ``masks [N, R, R]`` (binary, for dice).
    Returns per image ``(pred_index [M], gt_index [M])`` int64, M = min(P, N), sorted by pred_index.
    """

    def __init__(self, cfg: MatcherConfig, codec: Optional[MaskCodec] = None):
        super().__init__()
        self.cfg = cfg
        self.codec = codec
        if cfg.mask_cost == "dice" and codec is None:
            raise ValueError("matcher: mask_cost 'dice' needs the mask codec to decode predictions")

    def cost_matrix(self, logits: Tensor, boxes: Tensor, masks: Tensor, target: dict[str, Tensor]) -> Tensor:
        """The weighted cost [P, N] for one image."""
        c = self.cfg
        scale = target["image_size_xyxy"].float()
        cost = c.cost_class * class_cost(logits, target["labels"], c.focal_alpha, c.focal_gamma)
        cost = cost + c.cost_l1 * l1_cost(boxes / scale, target["boxes"] / scale)
        cost = cost + c.cost_giou * giou_cost(boxes, target["boxes"])
        if c.mask_cost == "cosine":
            cost = cost + c.cost_mask * cosine_mask_cost(masks, target["mask_emb"])
        elif c.mask_cost == "l1":
            cost = cost + c.cost_mask * l1_mask_cost(masks, target["mask_emb"])
        elif c.mask_cost == "dice":
            cost = cost + c.cost_mask * dice_mask_cost(self.codec.decode_logits(masks).sigmoid(), target["masks"])
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        indices = []
        for i, target in enumerate(targets):
            if target["labels"].numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(outputs["pred_logits"][i], outputs["pred_boxes"][i], outputs["pred_masks"][i], target)
            # diverged predictions (NaN/inf) must reach the loss, where training stops with a clear message
            cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
