"""A COCO-format instance segmentation dataset, validated on load.

Category ids are mapped to contiguous labels ``0..C-1`` in increasing id order (``label_to_category_id``
maps back for COCO results). Crowd annotations never become targets; COCOeval handles crowd regions
from ``.coco``, the original file.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from istr.data.validate import DatasetError, load_annotations

__all__ = ["CocoDetection", "DatasetError"]


class CocoDetection(torch.utils.data.Dataset):
    """Item ``i``: ``(image float32 [3, H, W] in 0..255, target)`` with target

        boxes     float32 [N, 4]  xyxy in (transformed) image pixels
        labels    int64 [N]       0..num_classes-1
        masks     uint8 [N, H, W] full-image bitmaps
        image_id  int             the COCO image id
        orig_size (h, w)          size of the image file, before transforms

    Args:
        images_dir: directory holding the ``file_name`` of every image.
        ann_file: COCO instances JSON; validated on load (``DatasetError``).
        transforms: callable ``(tv_tensors.Image uint8, target with tv_tensors) -> (image, target)``,
            e.g. ``istr.data.transforms.build_transforms``.
        skip_empty_images: drop images without a non-crowd annotation (the official training set).
    """

    def __init__(self, images_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Optional[Callable] = None, skip_empty_images: bool = False):
        self.images_dir = Path(images_dir)
        self.ann_file = str(ann_file)
        self.transforms = transforms
        self.coco = COCO()
        self.coco.dataset = load_annotations(ann_file, images_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.label_to_category_id: list[int] = sorted(self.coco.cats)
        self.category_id_to_label = {cat: label for label, cat in enumerate(self.label_to_category_id)}
        self.category_names = [self.coco.cats[cat]["name"] for cat in self.label_to_category_id]
        self.num_classes = len(self.label_to_category_id)
        self.ids: list[int] = sorted(self.coco.imgs)
        if skip_empty_images:
            self.ids = [i for i in self.ids if self._instances(i)]

    def __len__(self) -> int:
        return len(self.ids)

    def _instances(self, image_id: int) -> list[dict]:
        return [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]

    def load_image(self, image_id: int) -> torch.Tensor:
        """The image file as ``uint8 [3, H, W]`` RGB."""
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        try:
            image = decode_image(str(path), mode=ImageReadMode.RGB)
        except (OSError, RuntimeError) as err:
            raise DatasetError(f"{path}: image id {image_id}: cannot decode image ({err})") from err
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise DatasetError(f"{path}: image id {image_id}: image is {image.shape[-1]}x{image.shape[-2]} "
                               f"but {self.ann_file} says {info['width']}x{info['height']}")
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        height, width = image.shape[-2:]
        anns = self._instances(image_id)
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, height, width), np.uint8)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)  # validation tolerates boxes a pixel outside the image
        boxes[:, 1::2].clamp_(0, height)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.category_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "image_id": image_id,
            "orig_size": (int(height), int(width)),
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
        return image.as_subclass(torch.Tensor).to(torch.float32), target
