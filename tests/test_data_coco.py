"""COCO-format reading: item format, category mapping, crowd handling, validation messages, CLI, paths, mask_stream."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from istr.config import build_config
from istr.data import CocoDetection, DatasetError, build_datasets, collate, dataset_paths, mask_stream
from istr.data.validate import main as validate_main

H, W = 16, 20
CATEGORY_IDS = [12, 3, 7]  # not contiguous, not sorted


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": encoded["counts"].decode()}


def coco_json() -> dict:
    disc = np.hypot(*np.mgrid[0:H, 0:W] - np.array([8, 12])[:, None, None]) <= 4
    return {
        "images": [{"id": 5, "file_name": "a.png", "height": H, "width": W},
                   {"id": 9, "file_name": "b.png", "height": H, "width": W},
                   {"id": 11, "file_name": "empty.png", "height": H, "width": W}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 6, 4], "iscrowd": 0, "area": 24,
             "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]},  # polygon = its box
            {"id": 2, "image_id": 5, "category_id": 12, "bbox": [8, 4, 9, 9], "iscrowd": 0, "area": float(disc.sum()),
             "segmentation": rle(disc)},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 20, 16], "iscrowd": 1, "area": 320,
             "segmentation": rle(np.ones((H, W)))},
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [10, 8, 10, 8], "iscrowd": 0, "area": 80,
             "segmentation": [[10, 8, 20, 8, 20, 16, 10, 16]]},
        ],
        "categories": [{"id": c, "name": f"cat{c}"} for c in CATEGORY_IDS],
    }


def write_dataset(root: Path, data: dict, images: str = "images", ann: str = "ann.json") -> tuple[Path, Path]:
    (root / images).mkdir(parents=True, exist_ok=True)
    for info in data["images"]:
        Image.fromarray(np.full((H, W, 3), info["id"], np.uint8)).save(root / images / info["file_name"])
    (root / ann).parent.mkdir(parents=True, exist_ok=True)
    (root / ann).write_text(json.dumps(data))
    return root / images, root / ann


def test_item_format_labels_and_crowd(tmp_path):
    images, ann = write_dataset(tmp_path, coco_json())
    ds = CocoDetection(images, ann)
    assert ds.num_classes == 3 and ds.label_to_category_id == [3, 7, 12] and ds.ids == [5, 9, 11]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W) and image.max() == 5.0
    assert target["image_id"] == 5 and target["orig_size"] == (H, W)
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 3, 8, 7], [8, 4, 17, 13]]  # crowd annotation 3 left out
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    assert int(target["masks"][0].sum()) == 6 * 4 and target["masks"][0, 3:7, 2:8].all()
    # labels -> category ids round trip to the file's annotations
    assert [ds.label_to_category_id[label] for label in target["labels"].tolist()] == [7, 12]
    assert target["labels"].dtype == torch.int64
    assert ds[2][1]["boxes"].shape == (0, 4) and ds[2][1]["masks"].shape == (0, H, W)
    assert CocoDetection(images, ann, skip_empty_images=True).ids == [5, 9]
    assert len(ds.coco.getAnnIds(iscrowd=True)) == 1  # COCOeval still sees the crowd region


def test_collate_keeps_sizes(tmp_path):
    images, ann = write_dataset(tmp_path, coco_json())
    ds = CocoDetection(images, ann)
    batch_images, targets = collate([ds[0], ds[1]])
    assert len(batch_images) == 2 and [t["image_id"] for t in targets] == [5, 9]


def _bad(change):
    data = coco_json()
    change(data)
    return data


def _set(path, value):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


BAD_CASES = {
    "missing image file": (lambda d: d["images"].append({"id": 20, "file_name": "gone.png", "height": H, "width": W}),
                           "image id 20: image file gone.png not found"),
    "zero-size bbox": (_set(["annotations", 0, "bbox"], [2, 3, 0, 4]), "annotation id 1: bad bbox [2, 3, 0, 4]: zero or negative size"),
    "negative bbox": (_set(["annotations", 1, "bbox"], [8, 4, 9, -2]), "annotation id 2: bad bbox [8, 4, 9, -2]: zero or negative size"),
    "bbox outside": (_set(["annotations", 3, "bbox"], [10, 8, 15, 8]), "annotation id 4: bad bbox [10, 8, 15, 8]: outside the 20x16 image"),
    "short polygon": (_set(["annotations", 0, "segmentation"], [[2, 3, 8, 3]]), "annotation id 1: segmentation does not decode"),
    "rle wrong size": (_set(["annotations", 1, "segmentation", "size"], [H, W + 1]), "annotation id 2: segmentation does not decode: RLE size"),
    "rle bad counts": (_set(["annotations", 1, "segmentation", "counts"], "zzzz"), "annotation id 2: segmentation does not decode"),
    "rle short counts": (_set(["annotations", 3, "segmentation"], {"size": [H, W], "counts": [5, 5]}),
                         "annotation id 4: segmentation does not decode: RLE counts sum to 10, not 16*20"),
    "duplicate annotation id": (_set(["annotations", 3, "id"], 2), "annotation id 2: duplicate annotation id"),
    "duplicate image id": (_set(["images", 1, "id"], 5), "image id 5: duplicate image id"),
    "unknown category": (_set(["annotations", 0, "category_id"], 99), "annotation id 1: unknown category id 99"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_annotations_give_one_line_naming_file_id_and_problem(tmp_path, case, capsys):
    change, expected = BAD_CASES[case]
    data = _bad(change)
    images, ann = write_dataset(tmp_path, data)
    if case == "missing image file":
        (images / "gone.png").unlink()
    with pytest.raises(DatasetError) as err:
        CocoDetection(images, ann)
    message = str(err.value)
    assert message.startswith(f"{ann}: ") and expected in message and "\n" not in message
    assert validate_main([str(ann), "--images", str(images)]) == 1
    assert capsys.readouterr().out == f"ERROR: {message}\n"


def test_validate_cli_ok_and_failure_exit_codes(tmp_path):
    images, ann = write_dataset(tmp_path, coco_json())
    ok = subprocess.run([sys.executable, "-m", "istr.data.validate", str(ann), "--images", str(images)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout == f"OK: {ann}: 3 images, 4 annotations, 3 categories\n"
    assert validate_main([str(tmp_path / "nope.json")]) == 1


def test_unreadable_json_is_one_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"broken\.json: cannot read JSON"):
        CocoDetection(tmp_path, path)


def test_build_datasets_from_directory_layouts_and_overrides(tmp_path, monkeypatch):
    data = coco_json()
    val = copy.deepcopy(data)
    val["images"] = val["images"][:1]
    val["annotations"] = val["annotations"][:2]
    write_dataset(tmp_path / "custom", data, "train", "annotations/instances_train.json")
    write_dataset(tmp_path / "custom", val, "val", "annotations/instances_val.json")
    cfg = build_config("tiny", {"data.dataset": str(tmp_path / "custom"), "data.cache_dir": str(tmp_path / "cache")})
    train_ds, val_ds = build_datasets(cfg)
    assert train_ds.ids == [5, 9] and val_ds.ids == [5]  # training drops the image without instances
    assert train_ds.label_to_category_id == val_ds.label_to_category_id == [3, 7, 12]
    image, _ = val_ds[0]
    assert image.shape == (3, 64, 80)  # test-time short side 64 (tiny preset), 16x20 -> 64x80

    write_dataset(tmp_path / "coco2017", data, "train2017", "annotations/instances_train2017.json")
    write_dataset(tmp_path / "coco2017", val, "val2017", "annotations/instances_val2017.json")
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco2017"))
    paths = dataset_paths(build_config(None, {"data.dataset": "coco"}).data)
    assert paths["val_images"] == str(tmp_path / "coco2017" / "val2017")
    override = build_config(None, {"data.dataset": "coco", "data.val_annotations": str(tmp_path / "custom/annotations/instances_val.json")})
    assert dataset_paths(override.data)["val_annotations"].endswith("custom/annotations/instances_val.json")

    with pytest.raises(DatasetError, match=r"^\S*missing: dataset directory not found \(data.dataset\)"):
        dataset_paths(build_config(None, {"data.dataset": str(tmp_path / "missing")}).data)
    with pytest.raises(DatasetError, match="no COCO layout found"):
        dataset_paths(build_config(None, {"data.dataset": str(tmp_path / "custom" / "train")}).data)


def test_mask_stream_crops_masks_to_their_boxes(tmp_path):
    images, ann = write_dataset(tmp_path, coco_json())
    ds = CocoDetection(images, ann, skip_empty_images=True)
    batches = list(mask_stream(ds, resolution=28, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 28, 28), (1, 28, 28)]  # 3 non-crowd masks
    masks = torch.cat(batches)
    assert masks.dtype == torch.uint8 and set(masks.unique().tolist()) <= {0, 1}
    for full in (masks[0], masks[2]):  # polygons equal to their boxes fill the crop but for the
        assert full[2:-2].all() and full[:, 2:-2].all()  # corners, where bilinear sampling falls below 0.5
        assert full.float().mean() > 0.97
    disc = masks[1].bool()
    assert disc[14, 14] and not disc[0, 0] and not disc[27, 27]  # a disc: centre on, corners off
    assert 0.6 < disc.float().mean() < 0.9  # pi/4 of its box, up to pixelation
    assert sum(len(b) for b in mask_stream(ds.coco, resolution=14)) == 3
