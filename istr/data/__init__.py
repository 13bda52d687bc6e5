"""Data: the synthetic shapes dataset, COCO-format reading with validation, transforms, batching."""
from istr.data.build import build_datasets, collate, dataset_paths
from istr.data.coco import CocoDetection
from istr.data.mask_stream import mask_stream
from istr.data.shapes import ensure_synthetic
from istr.data.transforms import build_transforms
from istr.data.validate import DatasetError

__all__ = [
    "CocoDetection",
    "DatasetError",
    "build_datasets",
    "build_transforms",
    "collate",
    "dataset_paths",
    "ensure_synthetic",
    "mask_stream",
]
