"""COCO evaluation (box and mask) of every decoder stage.

pycocotools' COCOeval is the reference; ``backend="faster"`` uses faster-coco-eval (optional extra,
same numbers to 1e-4, see tests/test_engine_evaluate.py). Metrics are named ``{mask,box}_{stat}`` with
the 12 COCO stats below, on the 0..100 scale; a stat COCOeval leaves undefined (-1: no ground truth in
that area range) is ``None``.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from istr.engine import distributed
from istr.engine.cpu_bf16 import bf16_products_in_fp32
from istr.engine.precision import autocast

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
TASKS = {"segm": "mask", "bbox": "box"}


def metric_names() -> list[str]:
    """The 24 metric names of one stage: mask_AP ... mask_ARl, box_AP ... box_ARl."""
    return [f"{prefix}_{stat}" for prefix in TASKS.values() for stat in STAT_NAMES]


def to_coco_results(detections: dict[str, torch.Tensor], image_id: int, label_to_category_id: Sequence[int],
                    mask_threshold: float) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries, each with ``bbox`` (xywh) and, when the
    detections hold masks, ``segmentation`` (RLE of ``mask >= mask_threshold``)."""
    boxes = detections["boxes"].detach().float().cpu()
    if len(boxes) == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = detections["scores"].detach().float().cpu().tolist()
    categories = [int(label_to_category_id[int(label)]) for label in detections["labels"].cpu()]
    rles: list[Optional[dict]] = [None] * len(scores)
    if "masks" in detections:
        binary = (detections["masks"][:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)  # [K, H, W]
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
    results = []
    for box, score, category, rle in zip(xywh, scores, categories, rles):
        entry = {"image_id": int(image_id), "category_id": category, "bbox": [round(v, 3) for v in box],
                 "score": round(score, 5)}
        if rle is not None:
            entry["segmentation"] = rle
        results.append(entry)
    return results


def _empty_results(coco_gt: Any, coco_cls: type) -> Any:
    res = coco_cls()
    res.dataset = {"images": copy.deepcopy(coco_gt.dataset["images"]),
                   "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    res.createIndex()
    return res


def coco_stats(coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int],
               backend: str = "pycocotools", use_cats: bool = True) -> list[Optional[float]]:
    """The 12 COCOeval stats (x100, None where undefined) of ``results`` on ``image_ids``; ``use_cats=False``
    lets any detection match any object (class-agnostic)."""
    if iou_type == "segm":  # segm areas must come from the masks, not the boxes (as detectron2 does)
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
    else:
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    results = copy.deepcopy(results)  # loadRes writes into its input
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            gt, evaluator_cls = coco_gt, COCOeval
            dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt, COCO)
        elif backend == "faster":
            try:
                from faster_coco_eval import COCO as FastCOCO, COCOeval_faster
            except ImportError:
                raise RuntimeError("backend 'faster' needs faster-coco-eval: pip install 'istr-harness[fast]'") from None
            gt, evaluator_cls = FastCOCO(copy.deepcopy(coco_gt.dataset)), COCOeval_faster
            dt = gt.loadRes(results) if results else _empty_results(gt, FastCOCO)
        else:
            raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose pycocotools or faster")
        evaluator = evaluator_cls(gt, dt, iou_type)
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.params.useCats = int(use_cats)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [None if s < 0 else float(s) * 100.0 for s in evaluator.stats[:12]]


def _collate(batch):
    return [item[0] for item in batch], [item[1] for item in batch]


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, label_to_category_id: Sequence[int], device: torch.device,
            mask_threshold: float = 0.5, all_stages: bool = True, batch_size: int = 1, num_workers: int = 0,
            amp: str = "none") -> tuple[list[list[dict[str, Any]]], list[int]]:
    """COCO result entries per stage (stage 1..S) over ``dataset`` and the evaluated image ids.

    With several processes each rank predicts a strided share and every rank gets everything.
    """
    indices = list(range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    was_training = model.training
    model.eval()
    per_stage: list[list[dict[str, Any]]] = []
    image_ids: list[int] = []
    products = bf16_products_in_fp32(amp, device)
    for images, targets in loader:
        images = [image.to(device) for image in images]
        sizes = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        with autocast(device, amp), products:
            if all_stages:
                stages = model(images, all_stages=True, output_sizes=sizes)
            else:
                stages = [model(images, output_sizes=sizes)]
        if not per_stage:
            per_stage = [[] for _ in stages]
        for stage, dets_per_image in enumerate(stages):
            for dets, target in zip(dets_per_image, targets):
                per_stage[stage] += to_coco_results(dets, int(target["image_id"]), label_to_category_id, mask_threshold)
        image_ids += [int(t["image_id"]) for t in targets]
    model.train(was_training)
    gathered = distributed.all_gather_objects((per_stage, image_ids))
    num_stages = max(len(stages) for stages, _ in gathered)
    per_stage = [[r for stages, _ in gathered if stages for r in stages[s]] for s in range(num_stages)]
    return per_stage, sorted(i for _, ids in gathered for i in ids)


def evaluate(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", max_images: Optional[int] = None,
             mask_threshold: float = 0.5, all_stages: bool = True, backend: str = "pycocotools", batch_size: int = 1,
             num_workers: int = 0, amp: str = "none") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Box and mask COCO metrics of every stage of ``model`` on ``dataset`` (an ``istr.data`` COCO dataset:
    ``.coco``, ``.label_to_category_id``, items ``(image, target)`` with ``image_id`` and ``orig_size``).

    Returns ``({"final": {...}, "stages": {"1": {...}, ...}, "num_val_images": n}, detections)`` where
    ``detections`` are the last stage's COCO result entries (bbox + segmentation).
    """
    device = torch.device(device)
    subset = dataset if max_images is None else Subset(dataset, range(min(max_images, len(dataset))))
    if len(subset) == 0:
        raise ValueError("evaluation dataset has no images")
    per_stage, image_ids = predict(model, subset, dataset.label_to_category_id, device, mask_threshold, all_stages,
                                   batch_size, num_workers, amp)
    metrics: dict[str, Any] = {"stages": {}}
    if distributed.rank() == 0:
        for stage, results in enumerate(per_stage, start=1):
            values: dict[str, Optional[float]] = {}
            has_masks = any("segmentation" in r for r in results) or not results
            for iou_type, prefix in TASKS.items():
                if iou_type == "segm" and not has_masks:
                    continue
                stats = coco_stats(dataset.coco, results, iou_type, image_ids, backend)
                values.update({f"{prefix}_{name}": value for name, value in zip(STAT_NAMES, stats)})
            metrics["stages"][str(stage)] = values
        metrics["final"] = metrics["stages"][str(len(per_stage))]
        metrics["num_val_images"] = len(image_ids)
    metrics = distributed.broadcast_object(metrics)
    return metrics, per_stage[-1] if per_stage else []
