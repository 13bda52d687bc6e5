"""The synthetic shapes dataset: determinism, COCO readability, caching, atomic generation, mask structure."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from istr.config import ConfigError, DataConfig, SyntheticConfig
from istr.data import shapes


def tiny(seed: int = 3) -> SyntheticConfig:
    return SyntheticConfig(num_train=5, num_val=3, width=64, height=48, seed=seed)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical_for_a_seed(tmp_path):
    shapes.write_dataset(tmp_path / "a", tiny())
    shapes.write_dataset(tmp_path / "b", tiny())
    shapes.write_dataset(tmp_path / "c", tiny(seed=4))
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 5 + 3 + 2  # images + two annotation files
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_output_reads_in_pycocotools_and_matches_images(tmp_path, capsys):
    paths = shapes.ensure_synthetic(DataConfig(cache_dir=str(tmp_path), synthetic=tiny()))
    for split, count in (("train", 5), ("val", 3)):
        coco = COCO(paths[f"{split}_annotations"])
        assert len(coco.imgs) == count and sorted(c["name"] for c in coco.cats.values()) == sorted(shapes.CATEGORIES)
        assert coco.anns, "every split has instances"
        for ann in coco.anns.values():
            info = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann)
            assert mask.shape == (48, 64) and ann["iscrowd"] == 0
            assert mask.sum() == ann["area"] >= shapes.MIN_VISIBLE_PIXELS
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            with Image.open(Path(paths[f"{split}_images"]) / info["file_name"]) as image:
                assert image.size == (64, 48) and image.mode == "RGB"
        # visible parts of one image never overlap (occlusion is resolved)
        for image_id in coco.imgs:
            masks = [coco.annToMask(a) for a in coco.imgToAnns[image_id]]
            if masks:
                assert np.stack(masks).sum(0).max() == 1


def test_cached_dataset_is_reused_and_keyed_by_config(tmp_path, monkeypatch):
    cfg = DataConfig(cache_dir=str(tmp_path), synthetic=tiny())
    first = shapes.ensure_synthetic(cfg)
    monkeypatch.setattr(shapes, "write_dataset", lambda *a: pytest.fail("regenerated a cached dataset"))
    assert shapes.ensure_synthetic(cfg) == first
    other = DataConfig(cache_dir=str(tmp_path), synthetic=tiny(seed=9))
    assert shapes.dataset_key(other.synthetic) != shapes.dataset_key(cfg.synthetic)


def test_interrupted_generation_leaves_no_directory(tmp_path, monkeypatch):
    calls = []
    real = shapes.render_scene

    def failing(rng, height, width):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(rng, height, width)

    monkeypatch.setattr(shapes, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        shapes.ensure_synthetic(DataConfig(cache_dir=str(tmp_path), synthetic=tiny()))
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_bad_synthetic_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.synthetic\.width: must be >= 32, got 8$"):
        shapes.ensure_synthetic(DataConfig(cache_dir=str(tmp_path), synthetic=SyntheticConfig(width=8)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, param, area",
    [
        ("disc", None, math.pi),
        ("ring", 0.6, math.pi * (1 - 0.6**2)),  # a hole
        ("triangle", None, 3 * math.sqrt(3) / 4),
        ("ell", 0.4, 4 - (2 - 2 * 0.4) ** 2),  # concave
        ("star", 0.4, 5 * 0.4 * math.sin(math.pi / 5)),  # thin rays: 5 kites of two triangles
    ],
)
def test_unit_shapes_have_their_geometric_area(name, param, area):
    step = 1 / 400
    grid = np.arange(-1.5, 1.5, step) + step / 2
    u, v = np.meshgrid(grid, grid)
    inside = shapes._inside(name, u, v, param)
    assert inside.sum() * step * step == pytest.approx(area, rel=0.01)
    centre = shapes._inside(name, np.zeros(1), np.zeros(1), param)[0]
    assert centre == (name not in ("ring", "ell"))  # the ring's hole, the ell's missing quadrant


def test_scenes_have_several_categories_sizes_and_occlusion():
    labels, areas, occluded = [], [], 0
    for index in range(40):
        rng = np.random.default_rng([0, 1, index])
        image, instances = shapes.render_scene(rng, 128, 176)
        assert image.shape == (128, 176, 3) and image.dtype == np.uint8
        labels += [label for label, _ in instances]
        areas += [int(mask.sum()) for _, mask in instances]
        for k, (_, mask) in enumerate(instances):  # a visible part bordering a shape in front of it
            occluded += int(any(_touches(mask, other) for _, other in instances[k + 1 :]))
    assert set(labels) == set(range(len(shapes.CATEGORIES)))
    assert min(areas) >= shapes.MIN_VISIBLE_PIXELS and max(areas) >= 32 * 32  # small and medium COCO sizes
    assert occluded > 0


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """b is adjacent to a (4-neighbourhood): the occluder shares a border with the occluded part."""
    grown = a.copy()
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())
