"""Where a detector's AP goes: finding objects, naming them, or drawing their masks.

    python -m experiments.diagnose RESULT_DIR [RESULT_DIR ...] [--out reports/NAME]

Reads each result directory's ``config.yaml`` (for the val annotations) and ``detections.json`` (the final
model's COCO results) and measures, on the val split:

- COCO AP, AP50 and AR100 with categories (the usual numbers) and without them (``useCats=0``: every
  detection may match every object), for boxes and masks: the gap is what classification costs;
- per ground-truth object (crowd excluded), by COCO area range: *located* = some detection of any class has
  box IoU >= 0.5; *named* = the highest-scored of those has the right class; mask IoU >= 0.5 / 0.75 with any
  detection;
- the confusion matrix of those top detections (rows: true class, columns: predicted class or "missed").
- duplicates: per score level, detections per image and the share that repeat a higher-scored detection of the
  same class (box IoU >= 0.7), as a set predictor without NMS may.

Writes ``NAME.md`` when ``--out`` is given, else prints it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pycocotools.mask as mask_util
from pycocotools.coco import COCO

from istr.config import load
from istr.data import dataset_paths
from istr.engine.evaluate import coco_stats

from experiments import store

AREA_RANGES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, float("inf"))}
MISSED = "missed"


def coco_ap(gt: COCO, detections: list[dict[str, Any]], iou_type: str, use_cats: bool) -> dict[str, float]:
    """``{AP, AP50, AR100}`` (0..100, NaN where undefined) of ``detections`` on every image of ``gt``."""
    stats = coco_stats(gt, detections, iou_type, list(gt.imgs), use_cats=use_cats)
    return {name: math.nan if stats[i] is None else stats[i] for name, i in (("AP", 0), ("AP50", 1), ("AR100", 8))}


def _by_image(detections: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        by_image.setdefault(int(d["image_id"]), []).append(d)
    return by_image


def per_object(gt: COCO, detections: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per non-crowd ground-truth object: ``category, area, box_iou`` (best over all detections),
    ``mask_iou`` (best; NaN without masks), ``mask_iou_of_best_box`` (the mask IoU of the detection with the best
    box IoU), ``top_category`` (class of the highest-scored detection with box IoU >= 0.5, or None)."""
    by_image = _by_image(detections)
    rows = []
    for ann in gt.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        found = by_image.get(int(ann["image_id"]), [])
        box_iou = np.zeros(0)
        mask_iou = np.full(len(found), np.nan)
        if found:
            box_iou = mask_util.iou([d["bbox"] for d in found], [ann["bbox"]], [0])[:, 0]
            if all("segmentation" in d for d in found):
                mask_iou = mask_util.iou([d["segmentation"] for d in found], [gt.annToRLE(ann)], [0])[:, 0]
        overlapping = [i for i in range(len(found)) if box_iou[i] >= 0.5]
        top = max(overlapping, key=lambda i: found[i]["score"]) if overlapping else None
        rows.append({"category": gt.cats[ann["category_id"]]["name"], "area": float(ann["area"]),
                     "box_iou": float(box_iou.max()) if found else 0.0,
                     "mask_iou": float(np.nanmax(mask_iou)) if found and not np.isnan(mask_iou).all() else np.nan,
                     "mask_iou_of_best_box": float(mask_iou[box_iou.argmax()]) if found else np.nan,
                     "top_category": gt.cats[found[top]["category_id"]]["name"] if top is not None else None})
    return pd.DataFrame(rows)


def by_area(objects: pd.DataFrame) -> pd.DataFrame:
    """Fractions (0..1) located / named / mask IoU >= 0.5 / >= 0.75 per COCO area range and over all."""
    rows = {}
    for name, (low, high) in [*AREA_RANGES.items(), ("all", (0, float("inf")))]:
        part = objects[(objects.area >= low) & (objects.area < high)]
        rows[name] = {"objects": len(part),
                      "located": (part.box_iou >= 0.5).mean(),
                      "named": (part.top_category == part.category).mean(),
                      "mask IoU>=0.5": (part.mask_iou >= 0.5).mean(),
                      "mask IoU>=0.75": (part.mask_iou >= 0.75).mean()}
    return pd.DataFrame(rows).T


BOX_IOU_BINS = (0.5, 0.7, 0.8, 0.9, 1.0 + 1e-9)


def mask_by_box_iou(objects: pd.DataFrame) -> pd.DataFrame:
    """Objects binned by their best box IoU: how many, and the mean mask IoU of that same detection. At a
    given box IoU, a lower mask IoU means the mask inside the box is worse (not the box)."""
    rows = {}
    for low, high in zip(BOX_IOU_BINS, BOX_IOU_BINS[1:]):
        part = objects[(objects.box_iou >= low) & (objects.box_iou < high)]
        rows[f"box IoU {low:.1f}-{min(high, 1.0):.1f}"] = {"objects": len(part), "mean mask IoU": part.mask_iou_of_best_box.mean()}
    return pd.DataFrame(rows).T


SCORE_LEVELS = (0.1, 0.3, 0.5)
DUPLICATE_IOU = 0.7


def duplicates(detections: list[dict[str, Any]], num_images: int) -> pd.DataFrame:
    """Per score level t: detections with score >= t per image, and the fraction of them that duplicate a higher-scored
    detection of the same class in the same image (box IoU >= 0.7). A set predictor has no NMS: its loss alone must
    teach the proposals not to repeat each other."""
    rows = {}
    by_image = _by_image(detections)
    for level in SCORE_LEVELS:
        kept = repeated = 0
        for found in by_image.values():
            ranked = sorted((d for d in found if d["score"] >= level), key=lambda d: -d["score"])
            for i, d in enumerate(ranked):
                earlier = [e["bbox"] for e in ranked[:i] if e["category_id"] == d["category_id"]]
                if earlier:
                    repeated += mask_util.iou([d["bbox"]], earlier, [0] * len(earlier)).max() >= DUPLICATE_IOU
            kept += len(ranked)
        rows[f"score >= {level}"] = {"per image": kept / max(num_images, 1),
                                     "duplicates": repeated / kept if kept else math.nan}
    return pd.DataFrame(rows).T


def confusion(objects: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Counts: rows = true class, columns = class of the top located detection, or ``missed``."""
    predicted = objects.top_category.fillna(MISSED)
    table = pd.crosstab(objects.category, predicted).reindex(index=names, columns=[*names, MISSED], fill_value=0)
    return table.astype(int)


def diagnose(run_dir: str | Path, differences: str = "") -> dict[str, Any]:
    run = Path(run_dir)
    cfg = load(run / "config.yaml")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(dataset_paths(cfg.data)["val_annotations"])
    detections = json.loads((run / "detections.json").read_text())
    names = [gt.cats[c]["name"] for c in sorted(gt.cats)]
    objects = per_object(gt, detections)
    ap = {f"{task}, {'with classes' if cats else 'class-agnostic'}": coco_ap(gt, detections, iou, cats)
          for task, iou in (("box", "bbox"), ("mask", "segm")) for cats in (True, False)}
    spec = run / "spec.json"
    runner = json.loads(spec.read_text()).get("runner", "istr") if spec.is_file() else "istr"
    title = f"{run.name}: {runner}, {cfg.model.backbone.name}, {len(gt.imgs)} val images"
    title += f"; {differences}" if differences else ""
    return {"title": title, "ap": pd.DataFrame(ap).T, "areas": by_area(objects), "mask_by_box": mask_by_box_iou(objects),
            "confusion": confusion(objects, names), "duplicates": duplicates(detections, len(gt.imgs))}


def render(results: list[dict[str, Any]]) -> str:
    lines = ["# Error breakdown", "",
             "`python -m experiments.diagnose` on the final detections of each run, val split. *located*: some "
             "detection of any class has box IoU >= 0.5 with the object; *named*: the highest-scored such detection "
             "has the right class. Class-agnostic AP is COCOeval with `useCats=0`.", ""]
    for result in results:
        lines += [f"## {result['title']}", "", result["ap"].round(1).to_markdown(), "",
                  result["areas"].round(2).astype({"objects": int}).to_markdown(), "",
                  "Mask IoU of the best-box detection, by its box IoU:", "",
                  result["mask_by_box"].round(3).astype({"objects": int}).to_markdown(), "",
                  "Confusion of the top located detection (rows: true class):", "",
                  result["confusion"].to_markdown(), "",
                  f"Confident detections per image, and the share of them with box IoU >= {DUPLICATE_IOU} with a "
                  "higher-scored detection of the same class:", "",
                  result["duplicates"].round(3).to_markdown(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.diagnose", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RESULT_DIR", help="result directories with detections.json")
    parser.add_argument("--out", help="write OUT.md (e.g. reports/diagnose_smoke)")
    args = parser.parse_args(argv)
    for run in args.runs:
        problem = store.missing_run_files(run, ("config.yaml", "detections.json"))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    differences = store.config_differences(args.runs)  # what the sections compare, in their titles
    text = render([diagnose(run, differs) for run, differs in zip(args.runs, differences)])
    store.write_report_or_print(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
