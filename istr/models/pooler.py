"""Multi-scale RoIAlign over p2..p5 with the FPN level rule (aligned=True, unlike torchvision's MultiScaleRoIAlign)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


def assign_levels(boxes: Tensor, min_level: int = 2, max_level: int = 5, canonical_size: float = 224.0,
                  canonical_level: int = 4) -> Tensor:
    """FPN level per box: clamp(floor(4 + log2(sqrt(area) / 224 + 1e-8)), 2, 5) -> [N] int64 in min..max.

    The 1e-8 inside the log is detectron2's (the official code); torchvision's LevelMapper adds its 1e-6
    outside the log. Both only move boxes within ~1e-6 of a level boundary.
    """
    sizes = torch.sqrt(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp_min(0))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return levels.clamp(min_level, max_level).to(torch.int64)


def rois_from_boxes(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes [P_i, 4] -> rois [sum P_i, 5] (batch index, x1, y1, x2, y2)."""
    index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
    return torch.cat([index, torch.cat(list(boxes))], dim=1)


class MultiScalePooler(nn.Module):
    """RoIAlign(output_size, sampling_ratio, aligned=True) from the level each box is assigned to.

    forward(features [p2..p5, each [B, C, H_l, W_l]], boxes [per image [P_i, 4] xyxy in input pixels])
        -> [sum P_i, C, S, S]
    ``impl``: "torchvision" (torchvision.ops.roi_align) or "matmul" (istr.models.roi_align_matmul).
    """

    def __init__(self, output_size: int = 7, sampling_ratio: int = 2, strides: Sequence[int] = (4, 8, 16, 32),
                 impl: str = "torchvision"):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.strides = tuple(strides)
        self.impl = impl
        if impl == "torchvision":
            self._roi_align = roi_align
        elif impl == "matmul":
            from istr.models.roi_align_matmul import roi_align_matmul

            self._roi_align = roi_align_matmul
        else:
            raise ValueError(f"pooler impl: {impl!r} is not one of 'torchvision', 'matmul'")

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        rois = rois_from_boxes([b.detach().float() for b in boxes])  # RoIAlign has no box gradient anyway
        min_level = round(math.log2(self.strides[0]))  # stride 4 -> p2
        levels = assign_levels(rois[:, 1:], min_level, min_level + len(self.strides) - 1) - min_level
        return pool_by_level(self._roi_align, features, [1.0 / s for s in self.strides], rois, levels,
                             self.output_size, self.sampling_ratio, aligned=True)


def pool_by_level(roi_align_fn: Callable[..., Tensor], features: Sequence[Tensor], scales: Sequence[float], rois: Tensor,
                  levels: Tensor, output_size: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Each roi [R, 5] pooled from ``features[levels[r]]`` (levels [R] int, 0-based) -> [R, C, S, S] in features' dtype."""
    out = features[0].new_zeros(rois.shape[0], features[0].shape[1], output_size, output_size)
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.nonzero(levels == level).squeeze(1)
        if idx.numel():
            pooled = roi_align_fn(feature, rois[idx], output_size, scale, sampling_ratio, aligned)
            out = out.index_put((idx,), pooled.to(out.dtype))
    return out
