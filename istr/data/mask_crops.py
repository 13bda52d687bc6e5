"""The training set's ground-truth masks at 28x28 in their boxes: the input of the mask PCA fit."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import roi_align


def mask_stream(source: Any, resolution: int = 28, batch_size: int = 1024) -> Iterator[torch.Tensor]:
    """Every non-crowd GT mask cropped to its GT box, as binary ``uint8 [n, resolution, resolution]`` batches
    (n <= about ``batch_size``; the last batch may be smaller).

    ``source`` is a ``CocoDetection`` (its images, e.g. the training ids) or a pycocotools ``COCO`` (all
    images). Each mask is rasterised in the full image, then sampled in its box with RoIAlign
    (aligned=True) and thresholded at 0.5: the bitmap equivalent of rasterising the polygon in the box.
    """
    coco: COCO = source.coco if hasattr(source, "coco") else source
    image_ids = source.ids if hasattr(source, "ids") else sorted(coco.imgs)
    pending: list[torch.Tensor] = []
    count = 0
    for image_id in image_ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        if not anns:
            continue
        full = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).to(torch.float32)[:, None]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        rois = torch.cat([torch.arange(len(anns), dtype=torch.float32)[:, None], boxes], dim=1)
        crops = roi_align(full, rois, output_size=resolution, sampling_ratio=0, aligned=True)
        pending.append((crops[:, 0] >= 0.5).to(torch.uint8))
        count += len(anns)
        if count >= batch_size:
            yield torch.cat(pending)
            pending, count = [], 0
    if pending:
        yield torch.cat(pending)
