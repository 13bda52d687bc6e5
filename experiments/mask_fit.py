"""How well a trained ISTR predicts its mask embedding: per PCA coefficient, and in mask IoU.

    python -m experiments.mask_fit RESULT_DIR [RESULT_DIR ...] [--images 96] [--out reports/NAME]

On the first ``--images`` val images, the last stage's predictions are matched to the ground truth with the
model's own Hungarian matcher (as in training). For the matched pairs it reports:
  - R^2 of each predicted coefficient against the encoded ground truth (mean per block of 10 coefficients;
    1 = perfect, 0 = no better than predicting the mean);
  - mean IoU, in the 28x28 ground-truth box frame, of the decoded prediction with the ground-truth mask, of the
    decoded ground-truth embedding (the codec's ceiling), and of both truncated to their first k coefficients.
This separates the mask coefficients from the boxes: ``experiments.diagnose`` shows where masks lose against box
IoU; this shows which coefficients the model has learned.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from experiments import store
from istr.config import from_dict
from istr.data import build_datasets
from istr.engine.checkpoint import load_checkpoint
from istr.models import build_model
from istr.models.mask_coding import MaskCodec

TRUNCATIONS = (5, 10, 20, 40)
BLOCK = 10


def _mask_iou(probs: Tensor, masks: Tensor) -> float:
    """Mean IoU of ``probs >= 0.5`` [M, R*R] with binary ``masks`` [M, R*R]."""
    pred, gt = probs >= 0.5, masks > 0.5
    union = (pred | gt).sum(1).clamp(min=1)
    return float(((pred & gt).sum(1) / union).mean())


def coefficient_fit(pred: Tensor, gt: Tensor, masks: Tensor, codec: MaskCodec) -> dict[str, Any]:
    """``pred``, ``gt``: matched embeddings [M, l]; ``masks``: binary GT crops [M, R, R].

    Returns ``r2`` [l] (per coefficient), ``iou`` and ``iou_ceiling`` (full embeddings), and
    ``iou_first`` / ``iou_ceiling_first``: {k: IoU with the coefficients past k set to 0, the training mean}.
    """
    flat = masks.flatten(1).float()
    r2 = 1 - ((pred - gt) ** 2).sum(0) / ((gt - gt.mean(0)) ** 2).sum(0).clamp(min=1e-12)

    def iou(emb: Tensor, k: int | None = None) -> float:
        if k is not None:
            emb = emb.clone()
            emb[:, k:] = 0
        return _mask_iou(codec.decode(emb).flatten(1), flat)

    ks = [k for k in TRUNCATIONS if k < pred.shape[1]]
    return {"r2": r2, "iou": iou(pred), "iou_ceiling": iou(gt),
            "iou_first": {k: iou(pred, k) for k in ks}, "iou_ceiling_first": {k: iou(gt, k) for k in ks}}


@torch.inference_mode()
def matched_embeddings(model: torch.nn.Module, dataset, num_images: int, batch_size: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Last-stage predicted embeddings, encoded GT embeddings (soft labels as in training) and binary GT crops
    of the pairs the model's matcher assigns, over the first ``num_images`` images of ``dataset``."""
    criterion = model.criterion
    preds, gts, masks = [], [], []
    for start in range(0, min(num_images, len(dataset)), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, num_images, len(dataset)))]
        stage_outputs, sizes = model.stage_outputs([image for image, _ in items])
        last = stage_outputs[-1]
        targets = criterion.with_soft_embeddings(criterion.prepare_targets([t for _, t in items], sizes))
        for b, (src, gt) in enumerate(criterion.matcher(last, targets)):
            preds.append(last["pred_masks"][b, src].float())
            gts.append(targets[b]["mask_emb"][gt])
            masks.append(targets[b]["masks"][gt])
    return torch.cat(preds), torch.cat(gts), torch.cat(masks)


def fit_of_run(run_dir: str | Path, num_images: int) -> dict[str, Any]:
    run = Path(run_dir)
    ckpt = load_checkpoint(run / "checkpoints" / "final.pth")
    cfg = from_dict(ckpt["config"])
    _, val = build_datasets(cfg)
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    model.eval()
    torch.manual_seed(0)  # the soft-label draw of the GT embeddings
    pred, gt, masks = matched_embeddings(model, val, num_images)
    fit = coefficient_fit(pred, gt, masks, model.criterion.codec)
    return {"title": f"{run.name}: l={pred.shape[1]}, {len(pred)} matched objects on {min(num_images, len(val))} val images",
            **fit}


def render(results: Sequence[dict[str, Any]]) -> str:
    lines = ["# Mask-coefficient fit", "",
             "`python -m experiments.mask_fit`: the last stage's predictions on the first val images, matched to the "
             "ground truth by the model's own Hungarian matcher. R^2 of each predicted PCA coefficient against the "
             "encoded ground truth (1 = perfect, 0 = no better than the mean), and mean mask IoU, in the ground-truth "
             "box frame, of the decoded prediction and of the decoded ground-truth embedding (the codec's ceiling), "
             "full and truncated to the first k coefficients.", ""]
    for r in results:
        r2 = r["r2"]
        blocks = {f"{i + 1}-{min(i + BLOCK, len(r2))}": float(r2[i:i + BLOCK].mean()) for i in range(0, len(r2), BLOCK)}
        ious = pd.DataFrame({"predicted": {"all": r["iou"], **{f"first {k}": v for k, v in r["iou_first"].items()}},
                             "ground truth (codec ceiling)": {"all": r["iou_ceiling"],
                                                              **{f"first {k}": v for k, v in r["iou_ceiling_first"].items()}}})
        lines += [f"## {r['title']}", "", "Mean R^2 of the predicted coefficients, by block:", "",
                  pd.DataFrame({"R^2": blocks}).T.round(2).to_markdown(), "",
                  "Mean mask IoU in the ground-truth box frame (28x28), full and truncated embeddings:", "",
                  ious.round(3).to_markdown(), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.mask_fit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RESULT_DIR", help="ISTR result directories with checkpoints/final.pth")
    parser.add_argument("--images", type=int, default=96, help="val images to use (default 96)")
    parser.add_argument("--out", help="write OUT.md (e.g. reports/mask_fit_smoke)")
    args = parser.parse_args(argv)
    for run in args.runs:
        problem = store.missing_run_files(run, ("checkpoints/final.pth",))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    text = render([fit_of_run(run, args.images) for run in args.runs])
    store.write_report_or_print(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
