"""The synthetic COCO-format dataset: seeded instance-segmentation scenes of shapes.

Five categories with distinct mask structure: ``disc`` (convex), ``ring`` (a hole), ``triangle`` (corners),
``ell`` (concave L), ``star`` (thin rays). Each object gets a random scale, aspect, rotation, colour and
texture (flat, stripes, checker, speckle); later objects occlude earlier ones and each mask is the
visible part; objects left with too little visible area are removed from the scene (not painted), so no
unannotated shape is ever seen. Background: a colour gradient with noise and clutter (thin lines, small
squares) that is not an instance.

``ensure_synthetic(cfg.data)`` generates the dataset once into
``cfg.data.cache_dir/synthetic-<hash of cfg.data.synthetic>/`` in the COCO 2017 layout
(``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``, masks as compressed RLE)
and re-uses it. Generation writes into a temporary directory that is renamed when complete, so a
half-written dataset is never used. Image ``i`` of a split is drawn from its own generator seeded by
``(seed, split, i)``: the output is byte-identical for a given config.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from filelock import FileLock
from PIL import Image
from tqdm import tqdm

from istr.config import ConfigError, DataConfig, SyntheticConfig, to_dict

GENERATOR_VERSION = 2  # bump when the output changes: it is part of the cache key
CATEGORIES = ("disc", "ring", "triangle", "ell", "star")
SPLITS = {"train": ("train2017", 1), "val": ("val2017", 2)}  # split -> (directory name, seed stream)

MAX_OBJECTS = 6
SCALE_RANGE = (0.06, 0.7)  # object radius as a fraction of the short side, log-uniform; ~3% of instances are COCO-large at 176x128
MIN_VISIBLE_PIXELS = 16
MIN_VISIBLE_FRACTION = 0.25  # of the object's pixels inside the image


def dataset_key(syn: SyntheticConfig) -> str:
    """12 hex digits naming a synthetic config (and the generator version) in the cache."""
    payload = json.dumps({"generator_version": GENERATOR_VERSION, **to_dict(syn)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def dataset_paths(root: Path) -> dict[str, str]:
    return {
        f"{split}_{kind}": str(path)
        for split, (name, _) in SPLITS.items()
        for kind, path in (("images", root / name), ("annotations", root / "annotations" / f"instances_{name}.json"))
    }


def ensure_synthetic(data_cfg: DataConfig) -> dict[str, str]:
    """Paths ``train_images, train_annotations, val_images, val_annotations`` of the synthetic dataset,
    generated on first use. Safe against concurrent callers (file lock) and interruption (atomic rename)."""
    syn = data_cfg.synthetic
    _check_config(syn)
    root = Path(data_cfg.cache_dir) / f"synthetic-{dataset_key(syn)}"
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{root}.lock"):
            if not root.is_dir():
                tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
                try:
                    write_dataset(tmp, syn)
                    os.rename(tmp, root)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return dataset_paths(root)


def _check_config(syn: SyntheticConfig) -> None:
    for key, low in (("num_train", 1), ("num_val", 1), ("width", 32), ("height", 32)):
        if getattr(syn, key) < low:
            raise ConfigError(f"data.synthetic.{key}: must be >= {low}, got {getattr(syn, key)}")


def write_dataset(root: Path, syn: SyntheticConfig) -> None:
    """Write both splits (images + annotation JSON) under ``root``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with tqdm(total=syn.num_train + syn.num_val, desc="synthetic dataset", unit="img") as bar:
        for split, (name, stream) in SPLITS.items():
            count = syn.num_train if split == "train" else syn.num_val
            (root / name).mkdir()
            images, annotations = [], []
            for index in range(count):
                rng = np.random.default_rng([syn.seed, stream, index])
                image, instances = render_scene(rng, syn.height, syn.width)
                image_id, file_name = index + 1, f"{index + 1:06d}.png"
                Image.fromarray(image).save(root / name / file_name, format="PNG", compress_level=1)
                images.append({"id": image_id, "file_name": file_name, "height": syn.height, "width": syn.width})
                for label, mask in instances:
                    annotations.append(_annotation(len(annotations) + 1, image_id, label + 1, mask))
                bar.update()
            coco = {
                "info": {"description": f"ISTR synthetic shapes, {split}", "version": str(GENERATOR_VERSION), "config": to_dict(syn)},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)],
            }
            (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(coco, separators=(",", ":")))


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        "area": float(mask.sum()),
        "bbox": bbox,
        "iscrowd": 0,
    }


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: image ``uint8 [H, W, 3]`` and ``[(category index, visible mask bool [H, W])]`` back to front."""
    canvas = _background(rng, height, width)
    _clutter(rng, canvas)
    objects = [_random_object(rng, height, width) for _ in range(rng.integers(1, MAX_OBJECTS + 1))]

    # Front to back: an object's visible part is what the kept objects in front leave uncovered.
    occluder = np.zeros((height, width), bool)
    kept = []
    for label, full, paint in reversed(objects):
        visible = full & ~occluder
        area = int(visible.sum())
        if area >= MIN_VISIBLE_PIXELS and area >= MIN_VISIBLE_FRACTION * full.sum():
            kept.append((label, visible, full, paint))
            occluder |= full
    kept.reverse()
    for _, _, full, paint in kept:
        canvas[full] = paint[full]
    canvas += rng.normal(0.0, rng.uniform(0.0, 8.0), canvas.shape)
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return image, [(label, visible) for label, visible, _, _ in kept]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle, ``float [H, W, 3]``."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return start + (end - start) * t[..., None]


def _clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Thin line segments and small squares painted into ``canvas``: texture, never an instance."""
    height, width = canvas.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    for _ in range(rng.integers(1, 4)):
        (x0, x1), (y0, y1) = rng.uniform(0, width, 2), rng.uniform(0, height, 2)
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
        near = np.hypot(xs - x0 - t * dx, ys - y0 - t * dy) <= rng.uniform(0.5, 1.2)
        canvas[near] = rng.uniform(0, 255, 3)
    for _ in range(rng.integers(0, 5)):
        side = int(rng.integers(2, 7))
        top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        canvas[top : top + side, left : left + side] = rng.uniform(0, 255, 3)


def _random_object(rng: np.random.Generator, height: int, width: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(category index, full mask bool [H, W], paint float [H, W, 3])`` of one randomly placed shape."""
    label = int(rng.integers(len(CATEGORIES)))
    radius = min(height, width) * np.exp(rng.uniform(*np.log(SCALE_RANGE)))
    aspect = np.exp(rng.uniform(-0.3, 0.3))
    sx, sy = radius * aspect, radius / aspect
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    angle = rng.uniform(0, 2 * np.pi)
    shape_params = {"ring": rng.uniform(0.45, 0.7), "ell": rng.uniform(0.35, 0.55), "star": rng.uniform(0.3, 0.45)}

    # Only the object's bounding square is rasterised; unit-square shapes reach sqrt(2) * radius.
    reach = np.sqrt(2) * max(sx, sy)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
    dx, dy = xs - cx, ys - cy
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / sx
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / sy

    full = np.zeros((height, width), bool)
    full[y0:y1, x0:x1] = _inside(CATEGORIES[label], u, v, shape_params.get(CATEGORIES[label]))
    paint = np.zeros((height, width, 3))
    paint[y0:y1, x0:x1] = _texture(rng, u, v)
    return label, full, paint


def _inside(name: str, u: np.ndarray, v: np.ndarray, param: float | None) -> np.ndarray:
    """Membership of local coordinates ``(u, v)`` (object radius = 1) in the unit shape ``name``."""
    r2 = u * u + v * v
    if name == "disc":
        return r2 <= 1
    if name == "ring":  # param: inner radius
        return (r2 <= 1) & (r2 >= param * param)
    if name == "triangle":  # equilateral, circumradius 1: inside all three edges at distance 1/2
        normals = np.deg2rad([270.0, 30.0, 150.0])
        return np.all([np.cos(a) * u + np.sin(a) * v <= 0.5 for a in normals], axis=0)
    if name == "ell":  # param: arm thickness as a fraction of the unit square's side
        in_square = (np.abs(u) <= 1) & (np.abs(v) <= 1)
        return in_square & ((u <= -1 + 2 * param) | (v <= -1 + 2 * param))
    if name == "star":  # five rays; param: inner radius. Fold the angle into one half-ray sector.
        sector = 2 * np.pi / 5
        phi = np.abs(np.mod(np.arctan2(v, u), sector) - sector / 2)  # 0 at the ray tip
        r = np.sqrt(r2)
        px, py = r * np.cos(phi), r * np.sin(phi)
        bx, by = param * np.cos(sector / 2), param * np.sin(sector / 2)
        return (bx - 1) * py - by * (px - 1) >= 0  # on the origin's side of the edge tip -> inner vertex
    raise ValueError(f"unknown shape {name!r}")


def _texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Object colours ``float [h, w, 3]``: two random colours mixed by a random pattern in object coordinates."""
    first, second = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = rng.integers(4)
    if kind == 0:  # flat
        mix = np.zeros_like(u)
    elif kind == 1:  # stripes
        mix = 0.5 + 0.5 * np.sin(rng.uniform(3, 10) * u + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # checker
        freq = rng.uniform(1.5, 4)
        mix = (np.floor(freq * u) + np.floor(freq * v)) % 2
    else:  # speckle
        mix = rng.uniform(0, 1, u.shape) * rng.uniform(0.3, 1.0)
    return first + (second - first) * mix[..., None]
