"""Small stand-ins for the engine tests: a detector and datasets in the documented formats (docs/design.md)."""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from torch import nn

SIZE = 16


class FakeCriterion(nn.Module):
    """L1 + cross-entropy on one predicted box/class per image, normalised like ISTR's criterion
    (GT count all-reduced over processes and divided by the world size)."""

    def forward(self, boxes, logits, targets):
        num = torch.tensor(float(sum(len(t["labels"]) for t in targets)))
        if dist.is_initialized():
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        num = max(num.item(), 1.0)
        l1 = sum((b[None] - t["boxes"] / SIZE).abs().sum() for b, t in zip(boxes, targets)) / num
        ce = sum(nn.functional.cross_entropy(lg[None].expand(len(t["labels"]), -1), t["labels"], reduction="sum")
                 for lg, t in zip(logits, targets)) / num
        jitter = 1.0 + 0.1 * torch.rand(())  # training randomness from the global RNG, like ISTR's soft mask targets
        return {"loss_l1_s1": 5.0 * l1 * jitter, "loss_class_s1": 2.0 * ce}


class FakeDetector(nn.Module):
    """One box and class per image; ``num_stages`` identical-looking stages for evaluation."""

    def __init__(self, num_classes: int = 2, num_stages: int = 2):
        super().__init__()
        self.num_stages = num_stages
        self.backbone = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4 + num_classes)
        self.criterion = FakeCriterion()

    def forward(self, images, targets=None, all_stages=False, output_sizes=None):
        x = torch.stack(images) / 255.0
        feats = self.backbone(x).relu().mean((2, 3))
        out = self.head(feats)
        boxes = out[:, :4].sigmoid()
        boxes = torch.cat([boxes[:, :2] * 0.5, 0.5 + boxes[:, 2:] * 0.5], 1)  # well-formed xyxy in [0, 1]
        if self.training:
            return self.criterion(boxes, out[:, 4:], targets)
        sizes = output_sizes or [img.shape[-2:] for img in images]
        stages = []
        for stage in range(self.num_stages):
            dets = []
            for b, lg, (h, w) in zip(boxes, out[:, 4:], sizes):
                box = b * torch.tensor([w, h, w, h]) * (0.9 + 0.1 * stage / max(self.num_stages - 1, 1))
                mask = torch.zeros(1, 1, h, w)
                x0, y0, x1, y1 = box.round().int().tolist()
                mask[..., y0:y1, x0:x1] = 0.8
                dets.append({"boxes": box[None], "labels": lg.argmax()[None], "scores": lg.softmax(0).max()[None],
                             "masks": mask})
            stages.append(dets)
        return stages if all_stages else stages[-1]


class FakeDataset(torch.utils.data.Dataset):
    """``n`` images [3, 16, 16] whose content depends on the index, plus random noise from the global torch RNG
    (the augmentation randomness the engine must seed); one box per image."""

    num_classes = 2
    label_to_category_id = [1, 2]

    def __init__(self, n: int = 12):
        self.n = n
        self.coco = COCO()
        self.coco.dataset = {
            "images": [{"id": i, "width": SIZE, "height": SIZE} for i in range(n)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": i + 1, "image_id": i, "category_id": 1 + i % 2, "bbox": [*self.box(i)[:2], 8, 9],
                             "area": 72.0, "iscrowd": 0, "segmentation": rect(*self.box(i)[:2], 8, 9)} for i in range(n)]}
        self.coco.createIndex()

    @staticmethod
    def box(i):
        x0, y0 = 1 + i % 5, 2 + i % 3
        return [x0, y0, x0 + 8, y0 + 9]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        image = torch.rand(3, SIZE, SIZE, generator=gen) * 200 + torch.rand(3, SIZE, SIZE) * 50
        x0, y0 = self.box(i)[:2]
        box = torch.tensor([self.box(i)], dtype=torch.float32)
        masks = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
        masks[0, y0:y0 + 9, x0:x0 + 8] = 1
        target = {"boxes": box, "labels": torch.tensor([i % 2]), "masks": masks, "image_id": i,
                  "orig_size": (SIZE, SIZE)}
        return image, target


# ------------------------------------------------------------------------------------------------
# A hand-made COCO file and a model that replays hand-made detections
# ------------------------------------------------------------------------------------------------
def rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def handmade_coco() -> dict:
    """3 images (40x30, 40x30, 50x20), categories 1, 5, 7 (not contiguous), one crowd annotation."""
    images = [{"id": 11, "width": 40, "height": 30, "file_name": "a.png"},
              {"id": 12, "width": 40, "height": 30, "file_name": "b.png"},
              {"id": 13, "width": 50, "height": 20, "file_name": "c.png"}]
    cats = [{"id": 1, "name": "one"}, {"id": 5, "name": "five"}, {"id": 7, "name": "seven"}]
    spec = [(11, 1, (2, 2, 10, 8)), (11, 5, (15, 5, 20, 20)), (11, 7, (1, 20, 6, 6)),
            (12, 5, (5, 5, 30, 22)), (12, 5, (0, 0, 4, 4)), (13, 7, (10, 2, 30, 15)), (13, 1, (40, 10, 8, 8))]
    anns = []
    for k, (img, cat, (x, y, w, h)) in enumerate(spec, start=1):
        anns.append({"id": k, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": float(w * h),
                     "segmentation": rect(x, y, w, h), "iscrowd": 0})
    anns.append({"id": 99, "image_id": 12, "category_id": 1, "bbox": [20, 0, 10, 5], "area": 50.0,
                 "segmentation": rect(20, 0, 10, 5), "iscrowd": 1})
    return {"images": images, "annotations": anns, "categories": cats}


# (image_id, category_id, bbox xywh, score, mask polygon): near misses, wrong classes, duplicates, crowd hits
HANDMADE_DETECTIONS = [
    (11, 1, (2, 2, 10, 8), 0.9, rect(2, 2, 10, 8)),
    (11, 5, (14, 6, 20, 18), 0.8, rect(16, 6, 18, 18)),
    (11, 5, (14, 6, 20, 18), 0.3, rect(14, 6, 20, 18)),
    (11, 1, (1, 20, 6, 6), 0.6, rect(1, 20, 6, 6)),
    (12, 5, (6, 5, 28, 20), 0.95, rect(6, 6, 26, 20)),
    (12, 1, (21, 0, 9, 5), 0.7, rect(21, 0, 9, 5)),
    (12, 7, (0, 0, 4, 4), 0.2, rect(0, 0, 4, 4)),
    (13, 7, (12, 3, 25, 14), 0.85, rect(10, 2, 30, 15)),
    (13, 1, (38, 9, 10, 10), 0.5, rect(40, 12, 8, 6)),
]


class HandmadeDataset(torch.utils.data.Dataset):
    """Images carry their COCO image id in pixel (0, 0, 0) so ``ReplayModel`` can find its detections."""

    def __init__(self, coco_dict: dict):
        self.coco = COCO()
        self.coco.dataset = coco_dict
        self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.label_to_category_id = [c["id"] for c in coco_dict["categories"]]
        self.num_classes = len(self.label_to_category_id)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        info = self.coco.imgs[self.ids[i]]
        image = torch.zeros(3, 8, 8)  # the "resized" input; detections come at orig_size
        image[0, 0, 0] = info["id"]
        return image, {"image_id": info["id"], "orig_size": (info["height"], info["width"])}


def polygon_mask(poly, h, w) -> np.ndarray:
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(poly, h, w)))


class ReplayModel(nn.Module):
    """Returns HANDMADE_DETECTIONS for each image (xyxy boxes, 0-based labels, soft masks [K,1,H,W])."""

    def __init__(self, categories: list[int]):
        super().__init__()
        self.categories = categories

    def forward(self, images, all_stages=False, output_sizes=None):
        dets = []
        for image, (h, w) in zip(images, output_sizes):
            rows = [d for d in HANDMADE_DETECTIONS if d[0] == int(image[0, 0, 0])]
            boxes = torch.tensor([[x, y, x + bw, y + bh] for _, _, (x, y, bw, bh), _, _ in rows], dtype=torch.float32)
            masks = torch.stack([torch.from_numpy(polygon_mask(r[4], h, w)).float() * 0.7 + 0.1 for r in rows])
            dets.append({"boxes": boxes.reshape(-1, 4), "labels": torch.tensor([self.categories.index(r[1]) for r in rows]),
                         "scores": torch.tensor([r[3] for r in rows]), "masks": masks[:, None]})
        return [dets] if all_stages else dets
