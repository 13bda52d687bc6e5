"""experiments.gallery on a hand-made COCO file: what is drawn, which detections are shown, bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from istr.config import build_config, dump

from experiments import gallery

from result_fixtures import box_rle

SIZE = (30, 40)  # height, width


def _rle(box):
    return box_rle(box, SIZE)


def _run(tmp_path, name, detections, annotations="val.json"):
    run = tmp_path / name
    run.mkdir()
    paths = {f"data.{k}={tmp_path / v}" for k, v in (("train_images", "img"), ("val_images", "img"),
                                                      ("train_annotations", annotations), ("val_annotations", annotations))}
    dump(build_config("tiny", sorted(paths)), run / "config.yaml")
    (run / "detections.json").write_text(json.dumps(detections))
    return run


@pytest.fixture()
def runs(tmp_path):
    (tmp_path / "img").mkdir()
    images = []
    for image_id in (1, 2):
        Image.fromarray(np.full((*SIZE, 3), 200, np.uint8)).save(tmp_path / "img" / f"{image_id}.png")
        images.append({"id": image_id, "width": SIZE[1], "height": SIZE[0], "file_name": f"{image_id}.png"})
    boxes = {1: (2, 2, 10, 10), 2: (20, 10, 12, 12)}
    dataset = {"images": images, "categories": [{"id": 1, "name": "disc"}, {"id": 7, "name": "ring"}],
               "annotations": [{"id": i, "image_id": i, "category_id": 1 if i == 1 else 7, "bbox": list(b),
                                "area": b[2] * b[3], "iscrowd": 0, "segmentation": _rle(b)} for i, b in boxes.items()]}
    (tmp_path / "val.json").write_text(json.dumps(dataset))
    (tmp_path / "other.json").write_text(json.dumps(dataset))
    detections = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9, "segmentation": _rle(boxes[1])},
                  {"image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10], "score": 0.2, "segmentation": _rle(boxes[1])},
                  {"image_id": 2, "category_id": 7, "bbox": [20, 10, 12, 12], "score": 0.5, "segmentation": _rle(boxes[2])}]
    return tmp_path, _run(tmp_path, "a", detections), _run(tmp_path, "b", detections[:1])


def test_shown_detections_filter_by_image_and_score_highest_first():
    detections = [{"image_id": 1, "score": s} for s in (0.4, 0.9, 0.1, 0.6)] + [{"image_id": 2, "score": 1.0}]
    assert [d["score"] for d in gallery.shown_detections(detections, 1, 0.3, 10)] == [0.9, 0.6, 0.4]
    assert [d["score"] for d in gallery.shown_detections(detections, 1, 0.3, 2)] == [0.9, 0.6]


def test_draw_fills_the_mask_in_the_category_colour_and_leaves_the_rest():
    image = np.full((*SIZE, 3), 200, np.uint8)
    item = {"bbox": [2, 2, 10, 10], "segmentation": _rle((2, 2, 10, 10)), "category_id": 1, "score": 0.9}
    drawn = gallery.draw(image, [item], {1: "disc"}, {1: (255, 0, 0)}, show_scores=True)
    up = gallery.UPSCALE
    assert drawn.shape == (SIZE[0] * up, SIZE[1] * up, 3)
    y, x = 11 * up - 3, 7 * up  # in the mask, below the label text, inside the box outline
    inside = drawn[y, x]
    grey = 0.6 * 200 + 40
    assert inside[0] > grey + 50 and inside[1] < grey - 50 and inside[2] < grey - 50  # blended towards red
    assert (drawn[25 * up, 35 * up] == grey).all()  # far from the object: only dimmed
    assert (gallery.draw(image, [], {}, {}, show_scores=False) == grey).all()
    twice = gallery.draw(image, [item, {**item, "category_id": 2}], {1: "disc", 2: "ring"}, {1: (255, 0, 0), 2: (0, 0, 255)}, True)
    assert twice[y, x, 0] > twice[y, x, 2] > drawn[y, x, 2] + 10  # overlapping masks blend: red on top of blue


def test_cli_writes_figure_and_counts(runs, capsys):
    tmp_path, a, b = runs
    out = tmp_path / "reports" / "gallery"
    assert gallery.main([str(a), str(b), "--out", str(out), "--score", "0.3"]) == 0
    text = (tmp_path / "reports" / "gallery.md").read_text()
    assert "| 1 | 1.png | 1 | 1 | 1 |" in text  # the 0.2 detection is not shown
    assert "| 2 | 2.png | 1 | 1 | 0 |" in text
    assert Image.open(f"{out}.png").size[0] > 2 * SIZE[1] * gallery.UPSCALE  # three panels side by side
    assert not (tmp_path / "reports" / "gallery.svg").exists()


def test_cli_rejects_bad_input_and_writes_nothing(runs, capsys):
    tmp_path, a, _ = runs
    other = _run(tmp_path, "c", [], annotations="other.json")
    out = tmp_path / "out"
    assert gallery.main([str(a), str(other), "--out", str(out)]) == 2
    assert "different val annotations" in capsys.readouterr().err
    assert gallery.main([str(a), "--out", str(out), "--labels", "x", "y"]) == 2
    assert "--labels: 2 given for 1 run(s)" in capsys.readouterr().err
    assert gallery.main([str(a), "--out", str(out), "--image-ids", "9"]) == 2
    assert "--image-ids: [9] not in" in capsys.readouterr().err
    (a / "detections.json").unlink()
    assert gallery.main([str(a), "--out", str(out)]) == 2
    assert "no detections.json" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))
