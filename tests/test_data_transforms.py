"""Transforms keep image, boxes and masks consistent: flip, resize with cap, crop with instance removal."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision import tv_tensors

from istr.config import DataConfig
from istr.data.transforms import ResizeShortestEdge, build_transforms


def sample(height: int, width: int, rects: list[tuple[int, int, int, int]]):
    """Image with random content and one rectangular instance per ``(x0, y0, x1, y1)`` (box = mask extent)."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    masks = torch.zeros(len(rects), height, width, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        masks[k, y0:y1, x0:x1] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(rects, dtype=torch.float32), format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(len(rects)),
        "masks": tv_tensors.Mask(masks),
        "image_id": 7,
    }
    return image, target


def mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def data_cfg(**changes) -> DataConfig:
    base = DataConfig(min_size_train=(40,), max_size_train=1000, min_size_test=40, max_size_test=1000,
                      hflip_prob=0.0, crop_prob=0.0)
    return dataclasses.replace(base, **changes)


def test_hflip_maps_boxes_exactly_and_masks_follow():
    image, target = sample(40, 60, [(3, 5, 20, 30), (41, 0, 60, 12)])
    out_image, out = build_transforms(data_cfg(hflip_prob=1.0), train=True)(image, target)
    assert out["boxes"].tolist() == [[40, 5, 57, 30], [0, 0, 19, 12]]  # x -> 60 - x
    assert torch.equal(out["masks"], target["masks"].flip(-1)) and torch.equal(out_image, image.flip(-1))
    assert [mask_box(m) for m in out["masks"]] == out["boxes"].int().tolist()
    assert out["labels"].tolist() == [0, 1] and out["image_id"] == 7


def test_resize_scales_boxes_and_masks_and_caps_the_long_side():
    image, target = sample(40, 60, [(3, 5, 20, 30), (41, 0, 60, 12)])
    out_image, out = build_transforms(data_cfg(min_size_train=(80,)), train=True)(image, target)
    assert out_image.shape == (3, 80, 120)
    assert torch.equal(out["boxes"], target["boxes"] * 2)
    assert [mask_box(m) for m in out["masks"]] == (target["boxes"] * 2).int().tolist()

    capped_image, capped = build_transforms(data_cfg(min_size_test=80, max_size_test=100), train=False)(image, target)
    assert capped_image.shape == (3, 67, 100)  # 60 * s = 100 -> s = 5/3; 40 * 5/3 = 66.7 rounds to 67
    assert torch.allclose(capped["boxes"], target["boxes"] * torch.tensor([100 / 60, 67 / 40] * 2))
    for mask, box in zip(capped["masks"], capped["boxes"]):
        assert max(abs(a - b) for a, b in zip(mask_box(mask), box.tolist())) <= 1.0


def test_resize_picks_each_size_and_rounds_to_the_nearest_pixel():
    image, target = sample(427, 640, [(10, 10, 50, 50)])
    resize = ResizeShortestEdge([800], max_size=1333)
    assert resize(image, target)[0].shape == (3, 800, 1199)  # 640 * 800 / 427 = 1199.06
    torch.manual_seed(0)
    small, _ = sample(20, 30, [(1, 1, 5, 5)])
    seen = {ResizeShortestEdge([20, 30, 40])(small).shape[-2] for _ in range(30)}
    assert seen == {20, 30, 40}


def test_crop_drops_instances_outside_the_window():
    # 100x100, crop window 70x70 at left/top in 0..30: it never holds both opposite corner squares.
    rects = [(0, 0, 10, 10), (90, 90, 100, 100), (45, 45, 55, 55)]
    image, target = sample(100, 100, rects)
    cfg = data_cfg(crop_prob=1.0, crop_pre_sizes=(100,), crop_fraction=0.7, min_size_train=(70,))
    transform = build_transforms(cfg, train=True)
    kept_counts = []
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out = transform(image, target)
        assert out_image.shape == (3, 70, 70)
        labels = out["labels"].tolist()
        assert 2 in labels and len(labels) < 3  # the centre square always, never both corners
        assert len(out["boxes"]) == len(out["masks"]) == len(labels)
        left, top = (torch.tensor([45.0, 45.0]) - out["boxes"][labels.index(2), :2]).int().tolist()
        assert torch.equal(out_image, image[:, top : top + 70, left : left + 70])
        assert torch.equal(out["masks"], target["masks"][labels][:, top : top + 70, left : left + 70])
        for mask, box in zip(out["masks"], out["boxes"]):
            assert mask.any() and mask_box(mask) == box.int().tolist()  # clipped boxes still match the masks
        kept_counts.append(len(labels))
    assert set(kept_counts) == {1, 2}  # some crops keep a corner square, some keep none


@pytest.mark.parametrize("train", [True, False])
def test_float_images_pass_through(train):
    image, target = sample(40, 60, [(3, 5, 20, 30)])
    out_image, _ = build_transforms(data_cfg(min_size_train=(40,), min_size_test=40), train=train)(
        tv_tensors.Image(image.float()), target)
    assert out_image.dtype == torch.float32 and torch.equal(out_image, image.float())
