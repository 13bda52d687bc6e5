"""The mask-representation ceiling: COCO mask AP of the ground truth itself passed through the mask codec.

    python -m experiments.mask_ceiling [--scale smoke] [--components 40,60,80,784] [--out reports/mask_ceiling] [key=value ...]

Every val instance becomes a detection with its ground-truth box, class and score 1; its mask is cropped
to the box at 28x28, softened and encoded exactly as a training target (one fixed draw of the soft
labels), decoded and pasted back like a prediction. The mask AP of these perfect detections is the best
a model with that representation can reach on the data (box AP is 100 by construction): the headroom
against which smoke-scale Table 1a numbers should be read. Writes ``NAME.md`` when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from istr.config import ConfigError, build_config
from istr.data import DatasetError, build_datasets
from istr.engine.evaluate import STAT_NAMES, coco_stats, to_coco_results
from istr.engine.job import fit_or_load_pca
from istr.models.criterion import crop_masks
from istr.models.mask_coding import soften
from istr.models.paste import paste_masks

from experiments import store

REPORTED = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def ceiling(codec: Any, dataset: Any, r_min: float, r_max: float, seed: int = 0) -> dict[str, Any]:
    """``{mask_AP, ..., mask_APl}`` (0..100, None where undefined) of GT boxes with codec round-trip masks."""
    generator = torch.Generator().manual_seed(seed)
    results, image_ids = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = image.shape[-2:]
        boxes = target["boxes"].float()
        crops = crop_masks(target["masks"], boxes, codec.resolution)
        masks = codec.decode(codec.encode(soften(crops, r_min, r_max, generator)))
        pasted = paste_masks(masks, boxes, (height, width))
        detections = {"boxes": boxes, "labels": target["labels"], "scores": torch.ones(len(boxes)), "masks": pasted}
        results += to_coco_results(detections, int(target["image_id"]), dataset.label_to_category_id, 0.5)
        image_ids.append(int(target["image_id"]))
    stats = coco_stats(dataset.coco, results, "segm", image_ids)
    return {f"mask_{name}": value for name, value in zip(STAT_NAMES, stats) if name in REPORTED}


def render(rows: list[dict[str, Any]], scale: str, overrides: Sequence[str]) -> str:
    head = ["components", "explained variance"] + [f"mask_{s}" for s in REPORTED]
    lines = ["# Mask-representation ceiling", "",
             f"Ground-truth boxes, classes and masks passed through the PCA mask codec (scale `{scale}`"
             + (f", overrides `{' '.join(overrides)}`" if overrides else "") + "), evaluated with COCOeval on the "
             "val split. No model is involved: this is the best mask AP any model using the representation can "
             "reach on this data (box AP would be 100).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["components"]), f"{row['explained_variance']:.3f}"]
        cells += ["-" if row[f"mask_{s}"] is None else f"{row[f'mask_{s}']:.1f}" for s in REPORTED]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Command: `python -m experiments.mask_ceiling --scale " + scale
              + (" " + " ".join(overrides) if overrides else "") + "`", ""]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"component counts must be positive, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.mask_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. data.dataset=PATH)")
    parser.add_argument("--scale", default="smoke", help="the preset whose data and PCA settings are used")
    parser.add_argument("--components", type=_int_list, default=[40, 60, 80, 784],
                        help="comma-separated numbers of PCA components to measure, one cached PCA fit each "
                             "(default 40,60,80,784)")
    parser.add_argument("--out", default=None, help="write OUT.md (e.g. reports/mask_ceiling)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = build_config(args.scale, args.overrides)
        train_ds, val_ds = build_datasets(cfg, train_transforms=False)
        rows = []
        for components in args.components:
            cfg.model.mask.components = components
            codec = fit_or_load_pca(cfg, train_ds)
            row = {"components": components,
                   "explained_variance": float(codec.cumulative_explained_variance()[-1]),
                   **ceiling(codec, val_ds, cfg.model.mask.soft_r_min, cfg.model.mask.soft_r_max)}
            print(f"l={components}: explained variance {row['explained_variance']:.3f}, mask AP {row['mask_AP']:.1f}",
                  flush=True)
            rows.append(row)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        path = Path(args.out).with_suffix(".md")
        store.write_text_atomic(path, render(rows, args.scale, args.overrides))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
