"""ISTR vs Mask R-CNN inference latency (the ``latency`` runner) and the smoke-scale train-step ratio.

One job measures, in one process and interleaved (``istr.engine.latency``), at each size:
    istr              ISTR as built by ``istr.models.build_model``
    istr_fast         the same weights through ``istr.models.fast.optimize_for_inference``
    maskrcnn          torchvision Mask R-CNN, default box score threshold 0.05
    maskrcnn_100      the same weights, threshold 0: always 100 detections, like ISTR
    maskrcnn_100_fast maskrcnn_100 with the same generic fast path (BN folding, channels_last)
Weights are untrained (timing does not depend on their values except through what is kept and how large
its boxes are), made to behave like trained ones where that changes the work: every residual block starts
as the identity (``_bounded_activations``; otherwise FPN features reach 1e7 in R101 and untrained Mask R-CNN
keeps no detection at all), Mask R-CNN's classifier is made confident (``_confident_classifier``) and ISTR's
proposals are given object-sized boxes (``_object_like_boxes``); each case's mean number of detections and
box area are recorded next to its time.

``run_latency(cfg, output_dir, options)`` writes ``output_dir/metrics.json``: ``fps``, ``time_ms``, ``iqr_ms``
of the headline case (options.model: "istr" -> istr_fast, "maskrcnn" -> maskrcnn) at the first size, and
``sizes``, ``ratios``, ``environment``, ``protocol`` (and ``train_step`` when options.train_steps > 0).
``python -m baselines.latency --output reports/latency.md`` runs the same measurement and writes the report.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck

from baselines.latency_report import load_jobs, paper_reference, render_markdown
from baselines.maskrcnn import build_maskrcnn
from istr.config import Config, ConfigError, SolverConfig, build_config
from istr.engine.checkpoint import atomic_write_json, atomic_write_text
from istr.engine.cpu_bf16 import bf16_products_in_fp32, fp32_products_note
from istr.engine.latency import LatencyCase, LatencyResult, describe_environment, measure_latency
from istr.engine.precision import autocast
from istr.models import build_model
from istr.models.fast import optimize_for_inference

DEFAULT_OPTIONS: dict[str, Any] = {
    "model": "istr",
    "sizes": [[800, 1333]],
    "warmup": 2,
    "runs": 5,
    "cases": ["istr", "istr_fast", "maskrcnn", "maskrcnn_100", "maskrcnn_100_fast"],
    "images": "synthetic",  # or a directory of images (resized to each size)
    "train_steps": 0,  # > 0: also time training steps of both models at options.train_scale
    "train_scale": "smoke",
    "train_amp": None,  # None: the train scale's solver.amp; "none" / "bf16" override it (bf16 is emulated without AVX512-BF16/AMX)
}
HEADLINE = {"istr": "istr_fast", "maskrcnn": "maskrcnn"}
CASE_DESCRIPTIONS = {
    "istr": "ISTR as built (fp32, eval, inference_mode)",
    "istr_fast": "ISTR fast path: FrozenBN folded into convs, channels_last weights, NCHW pyramid for RoIAlign",
    "maskrcnn": "torchvision Mask R-CNN, default box_score_thresh 0.05, up to 100 detections",
    "maskrcnn_100": "torchvision Mask R-CNN, box_score_thresh 0: forced to 100 detections",
    "maskrcnn_100_fast": "maskrcnn_100 with the same generic fast path (FrozenBN folded, channels_last)",
}
ISTR_PARTS = {"backbone": "backbone", "head": "head", "post": "postprocess"}
MASKRCNN_PARTS = {"backbone": "backbone", "head": ["rpn", "roi_heads"], "post": "transform.postprocess"}


def resolve_options(options: Optional[dict[str, Any]]) -> dict[str, Any]:
    out = {**DEFAULT_OPTIONS, **(options or {})}
    unknown = sorted(set(out) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ConfigError(f"latency options: unknown {', '.join(unknown)}; valid: {', '.join(DEFAULT_OPTIONS)}")
    if out["model"] not in HEADLINE:
        raise ConfigError(f"latency options: model {out['model']!r} is not one of {', '.join(HEADLINE)}")
    bad = [c for c in out["cases"] if c not in CASE_DESCRIPTIONS]
    if bad or HEADLINE[out["model"]] not in out["cases"]:
        raise ConfigError(f"latency options: cases {out['cases']} must be among {', '.join(CASE_DESCRIPTIONS)} "
                          f"and include {HEADLINE[out['model']]}")
    if not out["sizes"] or any(len(s) != 2 or min(s) < 32 for s in out["sizes"]):
        raise ConfigError("latency options: each size must be a height and a width of at least 32 pixels "
                          f"(HEIGHTxWIDTH on the command line), got {out['sizes']}")
    return out


def _describe_detections(output: list[dict[str, Tensor]]) -> dict[str, float]:
    det = output[0]
    boxes, (h, w) = det["boxes"], det["masks"].shape[-2:]
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum() / (h * w) if len(boxes) else 0.0
    return {"detections": float(len(boxes)), "box_area_fraction": float(area) / max(len(boxes), 1)}


def build_cases(cfg: Config, names: Sequence[str]) -> list[LatencyCase]:
    """The timed models of one job, sharing weights where they are the same model."""
    torch.manual_seed(cfg.seed)
    cases, istr, maskrcnn = [], None, None
    for name in names:
        if name.startswith("istr"):
            if istr is None:
                istr = build_model(cfg.model).eval()
                _bounded_activations(istr)
                _object_like_boxes(istr)
            model = optimize_for_inference(istr) if name == "istr_fast" else istr
            cases.append(LatencyCase(name, model, ISTR_PARTS, _describe_detections))
        else:
            model = build_maskrcnn(cfg.model, score_thresh=0.05 if name == "maskrcnn" else 0.0).eval()
            if maskrcnn is None:
                maskrcnn = model
                _bounded_activations(maskrcnn)
                _confident_classifier(maskrcnn)
            model.load_state_dict(maskrcnn.state_dict())
            if name.endswith("_fast"):
                model = optimize_for_inference(model, nchw_outputs=None)
            cases.append(LatencyCase(name, model, MASKRCNN_PARTS, _describe_detections))
    return cases


def _bounded_activations(model: torch.nn.Module) -> None:
    """Zero the last norm scale of every residual block (torchvision's ``zero_init_residual``), so each block
    starts as the identity. Without it the un-normalised trunk (FrozenBN at identity statistics) grows its
    activations with depth: FPN features reach ~2e4 in R50 and ~2e7 in R101, where Mask R-CNN's softmax then
    puts all mass on background and keeps nothing. Dense convolutions cost the same whatever the values."""
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, Bottleneck):
                block.bn3.weight.zero_()
            elif isinstance(block, BasicBlock):
                block.bn2.weight.zero_()


CLASSIFIER_GAIN = 40.0


def _confident_classifier(maskrcnn: torch.nn.Module) -> None:
    """Scale Mask R-CNN's class logits by ``CLASSIFIER_GAIN`` (logit std ~0.03 -> ~1), so that, as in a trained
    model, some (proposal, class) pairs pass the 0.05 score threshold: with it, a 320x544 synthetic image has
    ~200 (R50) to ~1250 (R101) candidates before NMS and 100 detections after; without it, none."""
    with torch.no_grad():
        maskrcnn.roi_heads.box_predictor.cls_score.weight.mul_(CLASSIFIER_GAIN)


def _object_like_boxes(istr: torch.nn.Module) -> None:
    """Give untrained ISTR object-sized boxes: initial proposals drawn (seeded) with centres in the middle
    60% and sides 5-30% of the image (mean area ~3%; untrained Mask R-CNN keeps smaller ones, ~0.2%), and zero box
    regressors so that they stay put. Pasting cost grows with box area; whole-image boxes would be the
    worst case and unlike any trained model's output."""
    g = torch.Generator().manual_seed(0)
    n = istr.init_proposal_boxes.num_embeddings
    with torch.no_grad():
        istr.init_proposal_boxes.weight.copy_(torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=g),
                                                         0.05 + 0.25 * torch.rand(n, 2, generator=g)], dim=1))
        for stage in istr.head.stages:
            torch.nn.init.zeros_(stage.bboxes_delta.weight)
            torch.nn.init.zeros_(stage.bboxes_delta.bias)


def load_images(source: str, size: Sequence[int], count: int, seed: int = 0) -> tuple[list[Tensor], str]:
    """``count`` RGB float images [3, H, W] in 0..255 at exactly ``size``, and a description of them.

    "synthetic": scenes of the synthetic shapes dataset rendered straight at ``size``; a directory:
    its first ``count`` images (sorted by name), resized bilinearly.
    """
    h, w = int(size[0]), int(size[1])
    if source == "synthetic":
        from istr.data.shapes import render_scene

        images = [torch.from_numpy(render_scene(np.random.default_rng([seed, i]), h, w)[0]).permute(2, 0, 1).float()
                  for i in range(count)]
        return images, f"{count} synthetic-shapes scenes rendered at {h}x{w}"
    from PIL import Image

    files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if not files:
        raise ConfigError(f"latency options: images directory {source} holds no .jpg/.png files")
    images = []
    for path in files:
        rgb = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
        images.append(F.interpolate(rgb[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0])
    return images, f"{len(images)} images of {source} resized to {h}x{w}"


def _ratios(results: dict[str, LatencyResult]) -> dict[str, dict[str, float]]:
    """ISTR / Mask R-CNN time ratios: of the medians, and the median of the per-round (paired) ratios."""
    out = {}
    for a in ("istr_fast", "istr"):
        for b in ("maskrcnn", "maskrcnn_100", "maskrcnn_100_fast"):
            if a in results and b in results:
                ta, tb = np.array(results[a].times_s), np.array(results[b].times_s)
                out[f"{a}/{b}"] = {"of_medians": float(np.median(ta) / np.median(tb)), "paired": float(np.median(ta / tb))}
    return out


def measure(cfg: Config, options: dict[str, Any], log=print) -> dict[str, Any]:
    """All sizes of one job; returns the metrics dict (see the module docstring)."""
    options = resolve_options(options)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    cases = build_cases(cfg, options["cases"])
    for case in cases:
        case.model.to(device)
    sizes, ratios, image_notes = {}, {}, []
    for size in options["sizes"]:
        key = f"{size[0]}x{size[1]}"
        images, note = load_images(options["images"], size, max(options["runs"], 1), cfg.seed)
        image_notes.append(note)
        log(f"latency {key}: {len(cases)} models x ({options['warmup']} warm-up + {options['runs']} runs), {note}")
        results = measure_latency(cases, images, warmup=options["warmup"], runs=options["runs"], device=device)
        sizes[key] = {name: r.summary() for name, r in results.items()}
        ratios[key] = _ratios(results)
        for name, s in sizes[key].items():
            log(f"  {name:18s} {s['time_ms']:9.1f} ms (IQR {s['iqr_ms']:.1f})  {s['fps']:.3f} FPS")
    first = sizes[f"{options['sizes'][0][0]}x{options['sizes'][0][1]}"][HEADLINE[options["model"]]]
    metrics = {
        "fps": first["fps"], "time_ms": first["time_ms"], "iqr_ms": first["iqr_ms"],
        "headline": {"model": options["model"], "case": HEADLINE[options["model"]], "size": list(options["sizes"][0])},
        "backbone": cfg.model.backbone.name,
        "sizes": sizes, "ratios": ratios,
        "cases": {name: CASE_DESCRIPTIONS[name] for name in options["cases"]},
        "environment": describe_environment(device),
        "protocol": {"batch": 1, "dtype": "float32", "mode": "eval + torch.inference_mode", "warmup": options["warmup"],
                     "runs": options["runs"], "order": "interleaved, ABBA rounds, same image per round",
                     "statistic": "median and inter-quartile range", "images": image_notes,
                     "weights": "untrained; residual blocks start as the identity (zero_init_residual), Mask R-CNN "
                                f"class logits x{CLASSIFIER_GAIN:g}, ISTR proposals given object-sized boxes (sides 5-30% "
                                "of the image), box regressors zeroed"},
    }
    if options["train_steps"] > 0:
        amp = {"solver.amp": options["train_amp"]} if options["train_amp"] else {}
        metrics["train_step"] = measure_train_steps(options["train_scale"], options["train_steps"], log=log, overrides=amp)
    return metrics


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: list[Tensor],
               targets: list[dict[str, Any]], solver: SolverConfig, products: ContextManager,
               device_type: str = "cpu") -> Tensor:
    """One timed training iteration: forward under ``solver.amp`` and ``products`` (from ``bf16_products_in_fp32``),
    backward, full-model gradient clipping, optimizer step. Returns the detached loss."""
    with autocast(device_type, solver.amp), products:
        loss = sum(model(images, targets).values())
    with products:
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], solver.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure_train_steps(scale: str, steps: int, warmup: int = 1, log=print,
                        overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Seconds per training iteration (forward, backward, clipping, AdamW) of ISTR and Mask R-CNN at ``scale``
    (plus config ``overrides``), interleaved ABBA on the same synthetic training batches, under its ``solver.amp``."""
    from istr.data import build_datasets, collate
    from istr.engine.schedule import build_optimizer

    cfg = build_config(scale, dict(overrides or {}))
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    note = fp32_products_note(cfg.solver.amp, "cpu")
    if note:
        log(f"note: {note}")
    train_ds, _ = build_datasets(cfg)
    cfg.model.num_classes = train_ds.num_classes
    torch.manual_seed(cfg.seed)
    models = {"istr": build_model(cfg.model).train(),
              "maskrcnn": build_maskrcnn(cfg.model, anchor_scale=cfg.data.min_size_test / 800).train()}
    optimizers = {name: build_optimizer(m, cfg.solver) for name, m in models.items()}
    device = torch.device("cpu")
    batches = [collate([train_ds[(i * cfg.solver.batch_size + j) % len(train_ds)] for j in range(cfg.solver.batch_size)])
               for i in range(steps + warmup)]
    times: dict[str, list[float]] = {name: [] for name in models}
    products = bf16_products_in_fp32(cfg.solver.amp, device)
    for i, (images, targets) in enumerate(batches):
        for name in (list(models) if i % 2 == 0 else list(reversed(models))):
            start = time.perf_counter()
            train_step(models[name], optimizers[name], images, targets, cfg.solver, products)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    out = {name: {"median_s": float(np.median(t)), "iqr_s": float(np.subtract(*np.percentile(t, [75, 25]))), "steps": len(t)}
           for name, t in times.items()}
    out["ratio"] = out["istr"]["median_s"] / out["maskrcnn"]["median_s"]
    out["setting"] = (f"{scale} preset: {cfg.model.backbone.name}-FPN{cfg.model.backbone.fpn_channels}, batch "
                      f"{cfg.solver.batch_size} of {cfg.data.synthetic.width}x{cfg.data.synthetic.height}, amp "
                      f"{cfg.solver.amp}, {torch.get_num_threads()} threads; ISTR {cfg.model.head.num_stages} stages, "
                      f"{cfg.model.head.num_proposals} proposals; RoIAlign {cfg.model.head.pooler_impl} in both")
    log(f"train step ({out['setting']}): ISTR {out['istr']['median_s']:.3f} s, Mask R-CNN "
        f"{out['maskrcnn']['median_s']:.3f} s, ratio {out['ratio']:.2f}")
    return out


def run_latency(cfg: Config, output_dir: str | Path, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The ``latency`` runner: measure, then write ``output_dir/metrics.json`` (and ``latency.md``) atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = measure(cfg, options or {})
    atomic_write_text(output_dir / "latency.md", render_markdown(metrics))
    atomic_write_json(output_dir / "metrics.json", metrics)
    return metrics


def _size(text: str) -> list[int]:
    """``"800x1333"`` -> ``[800, 1333]`` (an argparse type: a bad value is one usage error)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not HEIGHTxWIDTH, e.g. 800x1333")
    return [int(p) for p in parts]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baselines.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="reports/latency.md", help="markdown report (a .json beside it)")
    parser.add_argument("--backbones", nargs="*", default=["resnet50"], choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                        help="backbones to measure (none: only render the --include files)")
    parser.add_argument("--sizes", nargs="+", type=_size, default=[[800, 1333]], metavar="HxW",
                        help="test sizes (short side x max size), e.g. 800x1333 512x853")
    parser.add_argument("--warmup", type=int, default=DEFAULT_OPTIONS["warmup"])
    parser.add_argument("--runs", type=int, default=DEFAULT_OPTIONS["runs"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--train-steps", type=int, default=0, help="also time N smoke-scale training steps of each model")
    parser.add_argument("--train-amp", choices=["none", "bf16"], default=None,
                        help="autocast of the training steps (default: the smoke preset's, bf16)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_OPTIONS["cases"], choices=list(CASE_DESCRIPTIONS))
    parser.add_argument("--include", nargs="+", default=[], metavar="JSON",
                        help="also render the jobs of these earlier outputs (e.g. measured on a GPU machine) in the report")
    parser.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    args = parser.parse_args(argv)
    try:
        included = [job for path in args.include for job in load_jobs(Path(path))]
        if not args.backbones and not included:
            raise ConfigError("nothing to report: give --backbones to measure or --include earlier JSON outputs")
        jobs = []
        for i, backbone in enumerate(args.backbones):
            cfg = build_config("paper", {"model.backbone.name": backbone, "device": args.device, "num_threads": args.threads})
            options = {"sizes": args.sizes, "warmup": args.warmup, "runs": args.runs, "cases": args.cases,
                       "train_steps": args.train_steps if i == 0 else 0, "train_amp": args.train_amp}
            jobs.append(measure(cfg, options, log=lambda m: print(m, file=sys.stderr)))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    argv = list(argv if argv is not None else sys.argv[1:])
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    command = "python -m baselines.latency " + " ".join(shown) + (" --note ..." if args.note else "")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, render_markdown(jobs + included, paper_reference(), command.strip(), args.note))
    atomic_write_json(output.with_suffix(".json"), jobs + included)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
