"""Data: the synthetic shapes dataset, COCO-format reading with validation, transforms, batching.

Names are imported on first use, so ``python -m istr.data.validate`` starts without torch.
"""
import importlib

_EXPORTS = {
    "CocoDetection": "istr.data.coco",
    "DatasetError": "istr.data.validate",
    "build_datasets": "istr.data.build",
    "build_transforms": "istr.data.transforms",
    "collate": "istr.data.build",
    "dataset_paths": "istr.data.build",
    "ensure_synthetic": "istr.data.shapes",
    "mask_stream": "istr.data.mask_crops",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'istr.data' has no attribute {name!r}")
