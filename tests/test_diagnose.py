"""experiments.diagnose on a hand-made COCO file: located / named / confusion / class-agnostic AP."""
import contextlib
import io

import pytest
from pycocotools.coco import COCO

from experiments import diagnose

from result_fixtures import box_rle


def _rle(box, size=(40, 40)):
    return box_rle(box, size)


@pytest.fixture()
def gt():
    boxes = [(2, 2, 10, 10), (20, 20, 12, 12), (2, 25, 8, 8)]  # disc, ring, disc
    dataset = {"images": [{"id": 1, "width": 40, "height": 40, "file_name": "1.png"}],
               "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "ring"}],
               "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": list(b), "area": b[2] * b[3],
                                "iscrowd": 0, "segmentation": _rle(b)}
                               for i, (b, c) in enumerate(zip(boxes, (1, 2, 1)))]}
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _det(box, category, score):
    return {"image_id": 1, "category_id": category, "bbox": list(box), "score": score, "segmentation": _rle(box)}


def test_located_named_and_confusion(gt):
    detections = [_det((2, 2, 10, 10), 1, 0.9),      # disc found and named
                  _det((20, 20, 12, 11), 1, 0.8),    # ring located, top detection says disc
                  _det((20, 20, 12, 12), 2, 0.3),    # ring named right, but scored lower
                  _det((30, 2, 6, 6), 2, 0.7)]       # on nothing; the small disc is missed
    objects = diagnose.per_object(gt, detections)
    assert list(objects.category) == ["disc", "ring", "disc"]
    assert objects.top_category.tolist()[:2] == ["disc", "disc"] and objects.top_category.isna().tolist() == [False, False, True]
    assert objects.box_iou.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert objects.mask_iou.tolist() == pytest.approx([1.0, 1.0, 0.0])
    table = diagnose.by_area(objects)
    assert table.loc["all", "located"] == pytest.approx(2 / 3)
    assert table.loc["all", "named"] == pytest.approx(1 / 3)
    assert table.loc["small", "objects"] == 3 and table.loc["medium", "objects"] == 0
    matrix = diagnose.confusion(objects, ["disc", "ring"])
    assert matrix.loc["disc"].tolist() == [1, 0, 1]  # disc, ring, missed
    assert matrix.loc["ring"].tolist() == [1, 0, 0]


def test_class_agnostic_ap_ignores_the_class(gt):
    wrong_class = [_det(a["bbox"], 3 - a["category_id"], 0.9) for a in gt.dataset["annotations"]]
    assert diagnose.coco_ap(gt, wrong_class, "bbox", use_cats=True)["AP"] == 0.0
    agnostic = diagnose.coco_ap(gt, wrong_class, "bbox", use_cats=False)
    assert agnostic["AP"] == pytest.approx(100.0) and agnostic["AR100"] == pytest.approx(100.0)
    assert diagnose.coco_ap(gt, wrong_class, "segm", use_cats=False)["AP50"] == pytest.approx(100.0)


def test_cli_rejects_a_directory_without_detections(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("{}")
    assert diagnose.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no detections.json (not a finished result directory)" in capsys.readouterr().err
    assert not (tmp_path / "out.md").exists()


def test_mask_quality_is_binned_by_the_same_detections_box_iou(gt):
    """A perfect box with a half-filled mask: box IoU 1.0, mask IoU 0.5, in the top bin."""
    half = _det((2, 2, 10, 10), 1, 0.9)
    half["segmentation"] = _rle((2, 2, 10, 5))
    detections = [half, _det((20, 20, 12, 9), 2, 0.8)]  # ring: box IoU 0.75, mask IoU 0.75
    objects = diagnose.per_object(gt, detections)
    assert objects.mask_iou_of_best_box.tolist()[:2] == pytest.approx([0.5, 0.75])
    table = diagnose.mask_by_box_iou(objects)
    assert table.loc["box IoU 0.9-1.0"].tolist() == pytest.approx([1, 0.5])
    assert table.loc["box IoU 0.7-0.8"].tolist() == pytest.approx([1, 0.75])
    assert table.loc["box IoU 0.8-0.9", "objects"] == 0


def test_duplicates_count_repeats_of_a_higher_scored_same_class_box(gt):
    detections = [_det((2, 2, 10, 10), 1, 0.9),
                  _det((2, 2, 10, 9), 1, 0.6),      # IoU 0.9 with the first, same class: a duplicate
                  _det((2, 2, 10, 10), 2, 0.4),     # same box, other class: not counted
                  _det((20, 20, 12, 12), 2, 0.35),
                  _det((2, 2, 10, 10), 1, 0.2)]     # a duplicate, below 0.3
    table = diagnose.duplicates(detections, num_images=2)
    assert table.loc["score >= 0.1"].tolist() == pytest.approx([2.5, 2 / 5])
    assert table.loc["score >= 0.3"].tolist() == pytest.approx([2.0, 1 / 4])
    assert table.loc["score >= 0.5"].tolist() == pytest.approx([1.0, 1 / 2])
