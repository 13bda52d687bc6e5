"""Evaluate a trained checkpoint on any COCO-format dataset (box and mask AP of every decoder stage).

    python -m istr.evaluate --checkpoint runs/smoke/checkpoints/final.pth --data my/annotations.json --images my/images
    python -m istr.evaluate --checkpoint CKPT --data my_coco_dir --output-dir runs/eval   # a COCO-layout directory

``--data`` is an instances JSON (then ``--images`` names its image directory) or a directory holding
``annotations/instances_val2017.json`` + ``val2017/`` (or ``instances_val.json`` + ``val/``). The dataset's
categories must be the ones the model was trained on (same category ids). ``key=value`` overrides change
the checkpoint's config, e.g. ``data.min_size_test=800 data.max_val_images=50 device=cpu``.
Writes ``metrics.json`` and ``detections.json`` (COCO results, last stage) to ``--output-dir`` if given.
Exit status: 0 done, 2 bad input (checkpoint, dataset, config key or value).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from istr.config import ConfigError, apply_overrides, from_dict

EXIT_BAD_INPUT = 2
VAL_LAYOUTS = (("instances_val2017.json", "val2017"), ("instances_val.json", "val"))


def resolve_data(data: str, images: Optional[str]) -> tuple[str, str]:
    """``(annotation file, images dir)`` from ``--data`` / ``--images``."""
    from istr.data.validate import DatasetError

    path = Path(data)
    if path.is_dir():
        for ann, img in VAL_LAYOUTS:
            if (path / "annotations" / ann).is_file():
                return str(path / "annotations" / ann), images or str(path / img)
        raise DatasetError(f"{path}: no annotations/instances_val2017.json or annotations/instances_val.json; "
                           "pass --data ANNOTATIONS.json --images DIR")
    if not path.is_file():
        raise DatasetError(f"--data {path}: no such file or directory")
    if images is None:
        raise DatasetError(f"--data {path} is an annotation file: --images DIR is needed too")
    return str(path), images


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m istr.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoints/final.pth or last.pth of a run")
    p.add_argument("--data", required=True, metavar="PATH", help="COCO instances JSON, or a COCO-layout directory")
    p.add_argument("--images", metavar="DIR", help="image directory (with an annotation-file --data)")
    p.add_argument("--output-dir", metavar="DIR", help="write metrics.json and detections.json here")
    p.add_argument("--backend", choices=("pycocotools", "faster"), default="pycocotools",
                   help="COCOeval implementation (faster: pip install -e '.[fast]' in the clone; same numbers to 1e-4)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (the paper tests with 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the checkpoint's config")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_intermixed_args(argv)
    import torch

    from istr.data.coco import CocoDetection
    from istr.data.transforms import build_transforms
    from istr.data.validate import DatasetError
    from istr.engine import distributed
    from istr.engine.checkpoint import CheckpointError, atomic_write_json, load_checkpoint
    from istr.engine.evaluate import evaluate, metric_names
    from istr.engine.job import resolve_device
    from istr.models import build_model

    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
        ckpt = load_checkpoint(args.checkpoint)
        if "config" not in ckpt:
            raise CheckpointError(f"{args.checkpoint}: holds no config; not written by istr.train")
        cfg = apply_overrides(from_dict(ckpt["config"]), args.overrides)
        ann_file, images_dir = resolve_data(args.data, args.images)
        dataset = CocoDetection(images_dir, ann_file, build_transforms(cfg.data, train=False))
        trained_on = ckpt.get("label_to_category_id") or dataset.label_to_category_id
        if list(trained_on) != dataset.label_to_category_id:
            raise DatasetError(f"{ann_file}: category ids {dataset.label_to_category_id} differ from the "
                               f"{list(trained_on)} the checkpoint was trained on")
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        device = resolve_device(cfg)
        model = build_model(cfg.model)
        model.load_state_dict(ckpt["model"])
        model.to(device)
        metrics, detections = evaluate(model, dataset, device, cfg.data.max_val_images, cfg.model.mask_threshold,
                                       all_stages=cfg.eval_all_stages, backend=args.backend,
                                       batch_size=args.batch_size, num_workers=cfg.data.num_workers)
    except (ConfigError, DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        distributed.cleanup()
    if args.output_dir:
        atomic_write_json(Path(args.output_dir) / "detections.json", detections)
        atomic_write_json(Path(args.output_dir) / "metrics.json", metrics)
    stages = metrics["stages"]
    print(f"{'metric':<12}" + "".join(f"{'stage ' + s:>10}" for s in stages))
    for name in metric_names():
        row = [stages[s].get(name) for s in stages]
        print(f"{name:<12}" + "".join(f"{'-' if v is None else f'{v:.2f}':>10}" for v in row))
    print(f"{metrics['num_val_images']} images, {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
