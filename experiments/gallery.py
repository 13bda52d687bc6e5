"""What the detectors draw: val images with the ground truth and each run's final detections, side by side.

    python -m experiments.gallery RESULT_DIR [RESULT_DIR ...] --out reports/gallery_smoke [--images 6] [--score 0.3]

Reads each result directory's ``config.yaml`` (for the val split) and ``detections.json`` (the final model's COCO
results, masks as RLE). One row per val image (the first ``--images`` image ids, or ``--image-ids``), one column for
the ground truth and one per run (titled by ``--labels``, else the directory and the config keys in which the runs
differ): masks filled in their category's colour, boxes, and "category score" for every
detection scoring at least ``--score`` (at most ``--max-detections`` per image, highest first). Every run must be on
the same val annotations. Writes ``OUT.png`` and ``OUT.md`` (the figure and, per image, how many objects and shown
detections), each atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from istr.config import load
from istr.data import dataset_paths

from experiments import plots, store

UPSCALE = 3  # synthetic images are 176x128: enlarge so that labels stay legible
FONT = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")  # shipped with matplotlib
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def draw(image: np.ndarray, items: Sequence[dict[str, Any]], names: dict[int, str], colours: dict[int, tuple],
         show_scores: bool) -> np.ndarray:
    """``image`` (H, W, 3) uint8 in dimmed grey, enlarged ``UPSCALE`` times, with ``items`` drawn on it (COCO annotations
    or results: ``bbox`` xywh, ``segmentation`` as RLE, ``category_id``, optional ``score``); (H*UPSCALE, W*UPSCALE, 3) uint8."""
    grey = torch.from_numpy(image).float().mean(-1, keepdim=True) * 0.6 + 40  # dimmed, so that mask colours stand out
    big = grey.expand(-1, -1, 3).round().to(torch.uint8).permute(2, 0, 1)
    big = big.repeat_interleave(UPSCALE, 1).repeat_interleave(UPSCALE, 2).contiguous()
    if not items:
        return big.permute(1, 2, 0).numpy()
    masks = np.stack([mask_util.decode(item["segmentation"]) for item in items])
    masks = torch.from_numpy(masks).bool().repeat_interleave(UPSCALE, 1).repeat_interleave(UPSCALE, 2)
    colours_ = [colours[item["category_id"]] for item in items]
    for mask, colour in zip(masks.flip(0), colours_[::-1]):  # one at a time (overlaps blend), the first on top
        big = draw_segmentation_masks(big, mask[None], alpha=0.55, colors=[colour])
    boxes = torch.tensor([item["bbox"] for item in items], dtype=torch.float32) * UPSCALE
    boxes[:, 2:] += boxes[:, :2]
    labels = [names[item["category_id"]] + (f" {item['score']:.2f}" if show_scores else "") for item in items]
    big = draw_bounding_boxes(big, boxes, labels=labels, colors=colours_, width=2, font=FONT, font_size=16)
    return big.permute(1, 2, 0).numpy()


def shown_detections(detections: Sequence[dict[str, Any]], image_id: int, score: float, limit: int) -> list[dict]:
    """The detections of ``image_id`` scoring at least ``score``, highest first, at most ``limit``."""
    kept = [d for d in detections if d["image_id"] == image_id and d["score"] >= score]
    return sorted(kept, key=lambda d: -d["score"])[:limit]


def gallery(runs: Sequence[str | Path], image_ids: Sequence[int] | None, num_images: int, score: float,
            limit: int, out: str, labels: Sequence[str] | None = None) -> str:
    """Draws ``OUT.png`` and returns the markdown of ``OUT.md``. Raises ValueError when the runs' val sets differ."""
    val = {run: dataset_paths(load(Path(run) / "config.yaml").data) for run in runs}
    annotations = {paths["val_annotations"] for paths in val.values()}
    if len(annotations) != 1:
        raise ValueError(f"the runs are evaluated on different val annotations: {', '.join(sorted(annotations))}")
    paths = next(iter(val.values()))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(paths["val_annotations"])
    ids = list(image_ids) if image_ids else sorted(gt.imgs)[:num_images]
    unknown = [i for i in ids if i not in gt.imgs]
    if unknown:
        raise ValueError(f"--image-ids: {unknown} not in {paths['val_annotations']}")
    names = {c: gt.cats[c]["name"] for c in gt.cats}
    colours = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(sorted(gt.cats))}
    detections = {run: json.loads((Path(run) / "detections.json").read_text()) for run in runs}
    columns = ["ground truth", *(labels or [f"{Path(run).name}\n{d}" if d else Path(run).name
                                              for run, d in zip(runs, store.config_differences(runs))])]
    fig, axes = plots.plt.subplots(len(ids), len(columns), figsize=(4.6 * len(columns), 3.5 * len(ids)), squeeze=False)
    rows = []
    for row, image_id in enumerate(ids):
        info = gt.imgs[image_id]
        image = np.array(Image.open(Path(paths["val_images"]) / info["file_name"]).convert("RGB"))
        objects = [{**a, "segmentation": gt.annToRLE(a)} for a in gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        panels = [draw(image, objects, names, colours, show_scores=False)]
        shown = [shown_detections(detections[run], image_id, score, limit) for run in runs]
        panels += [draw(image, items, names, colours, show_scores=True) for items in shown]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(columns[col], fontsize=10)
        axes[row, 0].set_ylabel(f"image {image_id}", fontsize=9)
        rows.append(f"| {image_id} | {info['file_name']} | {len(objects)} | " + " | ".join(str(len(s)) for s in shown) + " |")
    plots.save(fig, out, formats=("png",))
    name = Path(out).name
    selection = ["--image-ids", *map(str, image_ids)] if image_ids else ["--images", str(num_images)]
    command = shlex.join(["python", "-m", "experiments.gallery", *map(str, runs), "--out", out, *selection,
                          "--score", str(score), "--max-detections", str(limit), *(["--labels", *labels] if labels else [])])
    header = "| image id | file | objects | " + " | ".join(f"shown: {c}".replace("\n", "; ") for c in columns[1:]) + " |"
    return "\n".join([
        "# Detections on val images", "",
        f"`{command}` (val annotations: "
        f"`{paths['val_annotations']}`). Left: the ground truth (crowd excluded). Then each run's final detections "
        f"with score >= {score} (at most {limit} per image), masks in the colour of their category.", "",
        f"![gallery]({name}.png)", "", header, "|" + "---|" * (3 + len(runs)), *rows, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.gallery", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RESULT_DIR", help="result directories with detections.json")
    parser.add_argument("--out", required=True, help="write OUT.png and OUT.md (e.g. reports/gallery_smoke)")
    parser.add_argument("--images", type=int, default=6, help="the first N val images (default 6)")
    parser.add_argument("--image-ids", type=int, nargs="+", metavar="ID", help="these val image ids instead")
    parser.add_argument("--score", type=float, default=0.3, help="show detections scoring at least this (default 0.3)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="column titles, one per run (default: directory names)")
    parser.add_argument("--max-detections", type=int, default=20, help="per image and run (default 20)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.max_detections < 1:
        print("error: --images and --max-detections must be >= 1", file=sys.stderr)
        return 2
    if args.labels and len(args.labels) != len(args.runs):
        print(f"error: --labels: {len(args.labels)} given for {len(args.runs)} run(s)", file=sys.stderr)
        return 2
    for run in args.runs:
        problem = store.missing_run_files(run, ("config.yaml", "detections.json"))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    try:
        text = gallery(args.runs, args.image_ids, args.images, args.score, args.max_detections, args.out, args.labels)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    store.write_report_or_print(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
