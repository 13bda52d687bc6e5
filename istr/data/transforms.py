"""Training and test transforms (torchvision.transforms.v2) of the official ISTR configs.

Inputs are ``(image, target)``: image a ``tv_tensors.Image`` (uint8 or float, 0..255), target a dict with
``boxes`` (``tv_tensors.BoundingBoxes`` XYXY), ``labels [N]`` and ``masks`` (``tv_tensors.Mask [N, H, W]``);
other keys pass through untouched.

    train: horizontal flip (p = hflip_prob)
           -> with p = crop_prob: short side to one of crop_pre_sizes (no cap), then a crop_fraction*h x
              crop_fraction*w window at a random position
           -> short side to a random one of min_size_train, long side capped at max_size_train
           -> drop instances whose box or mask became empty
    test:  short side to min_size_test, long side capped at max_size_test
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from istr.config import DataConfig

INSTANCE_KEYS = ("boxes", "labels", "masks")  # target entries with one row per instance


class ResizeShortestEdge(v2.Transform):
    """Resize so the short side is a random choice of ``sizes`` and the long side at most ``max_size``.

    Output sizes are rounded to the nearest pixel (as detectron2's ResizeShortestEdge), where
    v2.RandomShortestSize truncates and can land one pixel short of the requested size.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        scale = size / min(height, width)
        if self.max_size is not None and max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return {"size": [int(height * scale + 0.5), int(width * scale + 0.5)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomRelativeCrop(v2.Transform):
    """Crop a ``round(fraction*h) x round(fraction*w)`` window at a uniformly random position.
    Boxes are shifted and clipped to the window."""

    def __init__(self, fraction: float):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = max(int(height * self.fraction + 0.5), 1), max(int(width * self.fraction + 0.5), 1)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class RemoveEmptyInstances:
    """Drop instances whose box has no area or whose mask has no pixel (e.g. cropped away)."""

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        boxes, masks = target["boxes"], target["masks"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (masks.flatten(1) > 0).any(1)
        if bool(keep.all()):
            return image, target
        target = dict(target)
        for key in INSTANCE_KEYS:
            value = target[key]
            target[key] = tv_tensors.wrap(value[keep], like=value) if isinstance(value, tv_tensors.TVTensor) else value[keep]
        return image, target


def build_transforms(data_cfg: DataConfig, train: bool) -> v2.Compose:
    """The train or test pipeline of ``data_cfg`` (see the module docstring)."""
    if not train:
        return v2.Compose([ResizeShortestEdge([data_cfg.min_size_test], data_cfg.max_size_test)])
    steps: list[Any] = []
    if data_cfg.hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(data_cfg.hflip_prob))
    if data_cfg.crop_prob > 0:
        crop = [ResizeShortestEdge(data_cfg.crop_pre_sizes), RandomRelativeCrop(data_cfg.crop_fraction)]
        steps.append(v2.RandomApply(crop, p=data_cfg.crop_prob))
    steps.append(ResizeShortestEdge(data_cfg.min_size_train, data_cfg.max_size_train))
    steps.append(RemoveEmptyInstances())
    return v2.Compose(steps)
