"""COCO evaluation: our pipeline (model output -> COCO results -> COCOeval per stage) against pycocotools
run by hand on a hand-made COCO file; faster-coco-eval parity; per-stage output format."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from engine_fakes import HANDMADE_DETECTIONS, FakeDataset, FakeDetector, HandmadeDataset, ReplayModel, handmade_coco, polygon_mask
from istr.engine.evaluate import STAT_NAMES, coco_stats, evaluate, metric_names

torch.set_num_threads(1)


def pycocotools_reference(coco_dict, iou_type):
    """The stats pycocotools computes for HANDMADE_DETECTIONS, written straight from the hand-made data."""
    gt = HandmadeDataset(coco_dict).coco
    sizes = {i["id"]: (i["height"], i["width"]) for i in coco_dict["images"]}
    results = []
    for image_id, cat, bbox, score, poly in HANDMADE_DETECTIONS:
        entry = {"image_id": image_id, "category_id": cat, "score": score}
        if iou_type == "bbox":
            entry["bbox"] = list(bbox)
        else:
            rle = mask_util.encode(np.asfortranarray(polygon_mask(poly, *sizes[image_id])))
            entry["segmentation"] = rle
        results.append(entry)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def run_handmade(backend="pycocotools"):
    ds = HandmadeDataset(handmade_coco())
    return evaluate(ReplayModel(ds.label_to_category_id), ds, backend=backend)


def test_handmade_detections_match_pycocotools():
    metrics, detections = run_handmade()
    assert set(metrics["stages"]) == {"1"} and metrics["final"] == metrics["stages"]["1"]
    assert metrics["num_val_images"] == 3
    assert len(detections) == len(HANDMADE_DETECTIONS)
    assert {d["category_id"] for d in detections} == {1, 5, 7}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        ref = pycocotools_reference(handmade_coco(), iou_type)
        assert 0 < ref[0] < 1  # a non-trivial case: neither all hits nor all misses
        for name, value in zip(STAT_NAMES, ref):
            ours = metrics["final"][f"{prefix}_{name}"]
            if value < 0:
                assert ours is None, name
            else:
                assert ours == pytest.approx(100 * value, abs=1e-9), (prefix, name)
    assert metrics["final"]["box_APs"] is not None and metrics["final"]["mask_APl"] is None  # no large GT here


def test_perfect_detections_score_100_and_none_score_0():
    coco_dict = handmade_coco()
    gt = HandmadeDataset(coco_dict).coco
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco_dict["annotations"] if not a["iscrowd"]]
    image_ids = [i["id"] for i in coco_dict["images"]]
    assert coco_stats(gt, perfect, "bbox", image_ids)[:2] == [100.0, 100.0]
    assert coco_stats(gt, [], "bbox", image_ids)[0] == 0.0


def test_faster_coco_eval_parity():
    pytest.importorskip("faster_coco_eval")
    reference, _ = run_handmade("pycocotools")
    fast, _ = run_handmade("faster")
    for name in metric_names():
        a, b = reference["final"][name], fast["final"][name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert abs(a - b) / 100 <= 1e-4, (name, a, b)


def test_every_stage_is_evaluated_and_named():
    torch.manual_seed(0)  # the fake weights and images come from the global RNG
    model = FakeDetector(num_stages=3).eval()
    torch.manual_seed(1)
    metrics, detections = evaluate(model, FakeDataset(6), max_images=4)
    assert list(metrics["stages"]) == ["1", "2", "3"]
    assert metrics["final"] == metrics["stages"]["3"]
    assert set(metrics["final"]) == set(metric_names()) and len(metric_names()) == 24
    assert metrics["num_val_images"] == 4 and len(detections) == 4
    # the fake stages shrink the boxes differently, so the stages' numbers are computed separately
    assert metrics["stages"]["1"]["box_AR1"] != metrics["stages"]["3"]["box_AR1"]
    torch.manual_seed(1)
    single, _ = evaluate(model, FakeDataset(6), max_images=4, all_stages=False)
    assert single["final"] == metrics["final"] and list(single["stages"]) == ["1"]
