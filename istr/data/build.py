"""Datasets from the config: the synthetic default, COCO 2017, or any COCO-format directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from istr.config import Config, DataConfig
from istr.data.coco import CocoDetection
from istr.data.shapes import ensure_synthetic
from istr.data.transforms import build_transforms
from istr.data.validate import DatasetError

PATH_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations")
SPLIT_NAMES = (("train2017", "val2017"), ("train", "val"))  # directory layouts looked for, in order
DEFAULT_COCO_ROOT = "datasets/coco"


def dataset_paths(data_cfg: DataConfig) -> dict[str, str]:
    """``{train_images, train_annotations, val_images, val_annotations}`` for ``data_cfg.dataset``:

    - ``"synthetic"``: generated on first use (``istr.data.shapes.ensure_synthetic``);
    - ``"coco"``: the COCO 2017 layout under ``$COCO_ROOT`` (default ``datasets/coco``);
    - a directory: ``annotations/instances_{train2017,val2017}.json`` with ``train2017/``, ``val2017/``, or the
      same with ``train``/``val``.
    Explicit ``data_cfg.train_images`` etc. override; when all four are set, ``dataset`` is not looked at.
    """
    explicit = {key: getattr(data_cfg, key) for key in PATH_KEYS}
    if all(explicit.values()):
        return explicit
    if data_cfg.dataset == "synthetic":
        found = ensure_synthetic(data_cfg)
    elif data_cfg.dataset == "coco":
        found = _coco_layout(Path(os.environ.get("COCO_ROOT", DEFAULT_COCO_ROOT)), "data.dataset=coco (root from $COCO_ROOT)")
    else:
        found = _coco_layout(Path(data_cfg.dataset), "data.dataset")
    return {key: explicit[key] or found[key] for key in PATH_KEYS}


def _coco_layout(root: Path, what: str) -> dict[str, str]:
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found ({what}); or set data.train_images, "
                           "data.train_annotations, data.val_images, data.val_annotations")
    for train, val in SPLIT_NAMES:
        anns = {split: root / "annotations" / f"instances_{split}.json" for split in (train, val)}
        if all(path.is_file() for path in anns.values()):
            return {"train_images": str(root / train), "train_annotations": str(anns[train]),
                    "val_images": str(root / val), "val_annotations": str(anns[val])}
    raise DatasetError(f"{root}: no COCO layout found ({what}): expected annotations/instances_train2017.json and "
                       "annotations/instances_val2017.json (or instances_train.json / instances_val.json)")


def build_datasets(cfg: Config, train_transforms: bool = True) -> tuple[CocoDetection, CocoDetection]:
    """``(train_ds, val_ds)``. The training set drops images without a non-crowd annotation and is
    augmented (test-time resize only when ``train_transforms`` is False); val keeps every image."""
    paths = dataset_paths(cfg.data)
    train_ds = CocoDetection(paths["train_images"], paths["train_annotations"],
                             build_transforms(cfg.data, train=train_transforms), skip_empty_images=True)
    val_ds = CocoDetection(paths["val_images"], paths["val_annotations"], build_transforms(cfg.data, train=False))
    if train_ds.label_to_category_id != val_ds.label_to_category_id:
        raise DatasetError(f"{paths['val_annotations']}: category ids {val_ds.label_to_category_id} differ from "
                           f"the training set's {train_ds.label_to_category_id} ({paths['train_annotations']})")
    return train_ds, val_ds


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...] -> ([image, ...], [target, ...])``: images keep their own sizes."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
