"""Validation of a COCO-format instance annotation file, and its command line.

    python -m istr.data.validate ANNOTATIONS.json --images DIR

prints ``OK: ...`` and exits 0, or prints one line naming the file, the image/annotation/category id and
the problem, and exits 1. ``load_annotations`` is what ``CocoDetection`` calls on load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

# Box edges may lie this many pixels outside the image (COCO boxes come from float polygons).
BOX_TOLERANCE_PX = 1.0


class DatasetError(ValueError):
    """A problem with a dataset on disk; the message is one line naming the file, the id and the problem."""


def load_annotations(ann_file: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and validate ``ann_file``; return its parsed JSON. With ``images_dir``, image files must exist.

    Raises DatasetError on the first problem found.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"{ann_file}: annotation file not found")
    try:
        data = json.loads(ann_file.read_bytes())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{ann_file}: cannot read JSON ({err.__class__.__name__}: {err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or non-list '{key}'")
    categories = _check_categories(ann_file, data["categories"])
    images = _check_images(ann_file, data["images"], images_dir)
    _check_annotations(ann_file, data["annotations"], images, categories)
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _new_id(ann_file: Path, item: Any, what: str, seen: Any) -> int:
    """The integer id of one category / image / annotation, checked to be an integer not in ``seen``."""
    value = item.get("id") if isinstance(item, dict) else None
    if not _is_int(value):
        raise DatasetError(f"{ann_file}: {what} {str(item)[:80]}: id must be an integer")
    if value in seen:
        raise DatasetError(f"{ann_file}: {what} id {value}: duplicate {what} id")
    return value


def _check_categories(ann_file: Path, categories: list) -> set[int]:
    seen: set[int] = set()
    if not categories:
        raise DatasetError(f"{ann_file}: no categories")
    for cat in categories:
        seen.add(_new_id(ann_file, cat, "category", seen))
    return seen


def _check_images(ann_file: Path, images: list, images_dir: str | os.PathLike | None) -> dict[int, tuple[int, int]]:
    """Returns ``{image id: (height, width)}``."""
    listing = set(os.listdir(images_dir)) if images_dir is not None and os.path.isdir(images_dir) else None
    if images_dir is not None and listing is None:
        raise DatasetError(f"{ann_file}: image directory {images_dir} not found")
    sizes: dict[int, tuple[int, int]] = {}
    for img in images:
        iid = _new_id(ann_file, img, "image", sizes)
        height, width, name = img.get("height"), img.get("width"), img.get("file_name")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise DatasetError(f"{ann_file}: image id {iid}: height/width must be positive integers, got {height!r}/{width!r}")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{ann_file}: image id {iid}: missing file_name")
        if listing is not None and name not in listing and not os.path.isfile(os.path.join(images_dir, name)):
            raise DatasetError(f"{ann_file}: image id {iid}: image file {name} not found in {images_dir}")
        sizes[iid] = (height, width)
    return sizes


def _check_annotations(ann_file: Path, annotations: list, images: dict, categories: set[int]) -> None:
    seen: set[int] = set()
    for ann in annotations:
        aid = _new_id(ann_file, ann, "annotation", seen)
        seen.add(aid)
        problem = _annotation_problem(ann, images, categories)
        if problem:
            raise DatasetError(f"{ann_file}: annotation id {aid}: {problem}")


def _annotation_problem(ann: dict, images: dict, categories: set[int]) -> str | None:
    """The first problem of one annotation as a phrase, or None."""
    if ann.get("image_id") not in images:
        return f"unknown image id {ann.get('image_id')!r}"
    if ann.get("category_id") not in categories:
        return f"unknown category id {ann.get('category_id')!r}"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}"
    height, width = images[ann["image_id"]]
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bad bbox {bbox}: zero or negative size"
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return f"bad bbox {bbox}: outside the {width}x{height} image"
    return _segmentation_problem(ann.get("segmentation"), height, width)


def _segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    if isinstance(segm, list):
        if not segm:
            return "segmentation does not decode: empty polygon list"
        for poly in segm:
            if not (isinstance(poly, list) and all(_is_number(v) for v in poly)):
                return "segmentation does not decode: a polygon must be a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"segmentation does not decode: a polygon needs an even number >= 6 of coordinates, got {len(poly)}"
        return None
    if isinstance(segm, dict):
        if segm.get("size") != [height, width]:
            return f"segmentation does not decode: RLE size {segm.get('size')!r} is not the image size [{height}, {width}]"
        counts = segm.get("counts")
        if isinstance(counts, (str, bytes)):
            counts = compressed_rle_counts(counts)
            if counts is None:
                return "segmentation does not decode: malformed compressed RLE counts"
        if not (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)):
            return "segmentation does not decode: RLE counts must be non-negative integers"
        if sum(counts) != height * width:
            return f"segmentation does not decode: RLE counts sum to {sum(counts)}, not {height}*{width}"
        return None
    return f"segmentation does not decode: expected polygons or RLE, got {type(segm).__name__}"


def compressed_rle_counts(text: str | bytes) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string, or None if malformed.

    pycocotools decodes such strings without checking that the runs fill the image, so we read them here:
    each count is 5-bit groups (char - 48), low group first, bit 0x20 = another group follows, bit 0x10 of
    the last group = sign; from the third count on, the value is a delta to the count two before.
    """
    data = text.encode() if isinstance(text, str) else text
    counts: list[int] = []
    value, shift = 0, 0
    for byte in data:
        chunk = byte - 48
        if not 0 <= chunk < 64:
            return None
        value |= (chunk & 0x1F) << shift
        shift += 5
        if chunk & 0x20:
            continue
        if chunk & 0x10:
            value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value, shift = 0, 0
    return counts if shift == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m istr.data.validate", description=__doc__.splitlines()[0])
    parser.add_argument("annotations", help="COCO-format instances JSON")
    parser.add_argument("--images", help="directory holding the image files (checked to exist)")
    args = parser.parse_args(argv)
    try:
        data = load_annotations(args.annotations, args.images)
    except DatasetError as err:
        print(f"ERROR: {err}")
        return 1
    print(
        f"OK: {args.annotations}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
        f"{len(data['categories'])} categories"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
