"""One experiment job: data -> mask PCA -> (pretrained backbone) -> model -> train -> evaluate -> files.

``train_and_evaluate(cfg, output_dir)`` writes into ``output_dir``::

    config.yaml        the resolved config (num_classes from the data, PCA and backbone files)
    log.txt            human-readable log
    metrics.jsonl      one line per solver.log_period iterations
    checkpoints/       last.pth (full state, for resuming), final.pth (model + config)
    detections.json    last stage, COCO results format
    metrics.json       {"final": {...}, "stages": {"1": ..., "S": ...}, "iterations", "train_time_s",
                        "eval_time_s", "num_val_images"}

Re-running resumes from ``checkpoints/last.pth``; a finished job returns its metrics without work.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from filelock import FileLock
from tqdm import tqdm

from istr.config import EVAL_PROTOCOL, Config, ConfigError, from_dict, stale_evaluation, starts_from_random_weights, to_dict
from istr.engine import distributed
from istr.engine.checkpoint import atomic_write_json, atomic_write_text
from istr.engine.cpu_bf16 import fp32_products_note
from istr.engine.evaluate import evaluate
from istr.engine.train import train


class _TqdmHandler(logging.Handler):
    """Console logging that does not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_logger(output_dir: Path, is_main: bool) -> logging.Logger:
    """``istr.run`` logger: console + ``output_dir/log.txt`` (appended) on rank 0, silent elsewhere."""
    log = logging.getLogger("istr.run")
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if is_main:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        for handler in (logging.FileHandler(output_dir / "log.txt"), _TqdmHandler()):
            handler.setFormatter(fmt)
            log.addHandler(handler)
    return log


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", distributed.env_info().local_rank)
    return torch.device("cpu")


def _setup(cfg: Config, output_dir: str | Path) -> tuple[Path, torch.device, logging.Logger]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg)
    distributed.init_distributed(device.type)
    return output_dir, device, setup_logger(output_dir, distributed.rank() == 0)


def _build_datasets(cfg: Config):
    from istr.data import build_datasets

    if distributed.rank() != 0:  # rank 0 generates/caches the synthetic data first
        distributed.barrier()
    datasets = build_datasets(cfg)
    if distributed.rank() == 0:
        distributed.barrier()
    return datasets


def dataset_identity(dataset: Any) -> str:
    """sha256 of the training annotations: what a cached PCA or pretrained backbone was fitted on."""
    digest = hashlib.sha256()
    ann_file = getattr(dataset, "ann_file", None)
    if ann_file is not None and Path(ann_file).is_file():
        with open(ann_file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(json.dumps(dataset.coco.dataset, sort_keys=True).encode())
    return digest.hexdigest()


def _pca_masks(train_ds: Any, resolution: int):
    from istr.data import mask_stream

    return mask_stream(train_ds, resolution=resolution)


def fit_or_load_pca(cfg: Config, train_ds: Any, log: Optional[logging.Logger] = None):
    """The training set's mask PCA (``MaskCodec``), fitted once and cached under
    ``cfg.data.cache_dir/pca-<hash>/pca.pt``; ``cfg.model.mask.pca_file`` overrides."""
    from istr.data import DatasetError
    from istr.models.mask_coding import MaskCodec, fit_pca

    mask, components = cfg.model.mask, cfg.model.mask.components
    if mask.pca_file:
        return MaskCodec.load(mask.pca_file)
    key = json.dumps({"data": dataset_identity(train_ds), "components": components, "resolution": mask.resolution,
                      "r_min": mask.soft_r_min, "r_max": mask.soft_r_max, "seed": cfg.seed}, sort_keys=True)
    cache = Path(cfg.data.cache_dir) / f"pca-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    path = cache / "pca.pt"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".lock")):
        if not path.exists():
            start = time.perf_counter()
            try:
                codec = fit_pca(_pca_masks(train_ds, mask.resolution), components, mask.soft_r_min, mask.soft_r_max,
                                seed=cfg.seed, source=key, resolution=mask.resolution)
            except ValueError as err:  # e.g. fewer training masks than components
                raise DatasetError(f"{getattr(train_ds, 'ann_file', 'training set')}: cannot fit the mask PCA ({err})") from None
            codec.save(path)
            atomic_write_text(cache / "key.json", key + "\n")
            if log:
                log.info("fitted mask PCA (l=%d) on %d masks in %.1f s -> %s", components,
                         codec.metadata.get("count", -1), time.perf_counter() - start, path)
    return MaskCodec.load(path)


def _check_or_write_config(cfg: Config, output_dir: Path) -> None:
    """An output directory belongs to one config: refuse to resume a different one."""
    path = output_dir / "config.yaml"
    data = to_dict(cfg)
    if path.exists():
        old = to_dict(from_dict(yaml.safe_load(path.read_text())))  # keys added since it was written get their old meaning
        if old != data:
            diff = diff_keys(old, data)
            raise ConfigError(f"{output_dir} holds a run with another config (differs in {', '.join(diff[:5])}); "
                              "use a new --output-dir")
    elif distributed.rank() == 0:
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Sorted dotted keys whose values differ between two nested config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(k for key in set(a) | set(b) for k in diff_keys(a.get(key), b.get(key), f"{prefix}{key}."))
    return [] if a == b else [prefix.rstrip(".")]


def _read_metrics(output_dir: Path) -> Optional[dict[str, Any]]:
    """metrics.json, or None when it is missing, corrupt, or a detector's evaluated under an older EVAL_PROTOCOL."""
    try:
        metrics = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return None if stale_evaluation(metrics) else metrics


def build_istr(cfg: Config, train_ds: Any, log: logging.Logger) -> torch.nn.Module:
    """The ISTR model of ``cfg`` with the training set's mask PCA (fitted once, cached)."""
    from istr.models import build_model

    codec = None
    if cfg.model.mask.representation == "pca":
        if distributed.rank() == 0:
            codec = fit_or_load_pca(cfg, train_ds, log=log)
        distributed.barrier()
        codec = codec or fit_or_load_pca(cfg, train_ds)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every rerun
    return build_model(cfg.model, mask_codec=codec)


ModelFactory = Callable[[Config, Any, logging.Logger], torch.nn.Module]  # (resolved cfg, train set, log) -> model


def prepare(cfg: Config, log: logging.Logger, build: ModelFactory = build_istr):
    """Resolve data, num_classes and backbone weights, then build; returns (cfg, train_ds, val_ds, model)."""
    cfg = copy.deepcopy(cfg)
    train_ds, val_ds = _build_datasets(cfg)
    cfg.model.num_classes = train_ds.num_classes
    if cfg.pretrain.enabled:
        from istr.engine.pretrain import ensure_pretrained_backbone

        cfg.model.backbone.weights = str(ensure_pretrained_backbone(cfg))
    torch.manual_seed(cfg.seed)
    return cfg, train_ds, val_ds, build(cfg, train_ds, log)


def random_init_warning(cfg: Config) -> Optional[str]:
    """One line when ``starts_from_random_weights(cfg)``."""
    if not starts_from_random_weights(cfg):
        return None
    return (f"{cfg.model.backbone.name} starts from random weights on {cfg.data.dataset} (the paper starts from ImageNet): "
            "give model.backbone.weights=/path/to/weights.pth (a torchvision state dict)")


def train_and_evaluate(cfg: Config, output_dir: str | Path, profile_iters: int = 0, build: ModelFactory = build_istr,
                       all_stages: Optional[bool] = None) -> dict[str, Any]:
    """Train (resuming), evaluate, write the job's files; returns metrics.json's content.

    ``build`` makes the detector (ISTR by default; the Mask R-CNN baseline passes its own builder), so every
    model shares this data, training loop, evaluation and file layout. ``all_stages`` defaults to
    ``cfg.eval_all_stages``. With ``profile_iters`` only prints the training time breakdown and returns ``{}``.
    """
    output_dir, device, log = _setup(cfg, output_dir)
    done = _read_metrics(output_dir)
    if done is not None and not profile_iters:
        log.info("%s is complete; nothing to do", output_dir)
        return done
    for level, line in ((logging.INFO, fp32_products_note(cfg.solver.amp, device.type)),
                        (logging.WARNING, random_init_warning(cfg))):
        if line:
            log.log(level, line)
    cfg, train_ds, val_ds, model = prepare(cfg, log, build)
    if profile_iters:
        train(model, train_ds, cfg, output_dir, device, log, profile_iters=profile_iters)
        return {}
    _check_or_write_config(cfg, output_dir)
    log.info("training %s on %s (%d processes), %d train / %d val images, %d classes", type(model).__name__, device,
             distributed.world_size(), len(train_ds), len(val_ds), cfg.model.num_classes)
    all_stages = cfg.eval_all_stages if all_stages is None else all_stages

    def evaluate_stages(trained: torch.nn.Module, max_images: Optional[int], num_workers: int = 0):
        metrics, detections = evaluate(trained, val_ds, device, max_images, cfg.model.mask_threshold,
                                       all_stages=all_stages, num_workers=num_workers)
        if not all_stages:  # the one evaluated stage is the last
            metrics["stages"] = {str(cfg.model.head.num_stages): metrics["final"]}
        return metrics, detections

    result = train(model, train_ds, cfg, output_dir, device, log,
                   periodic_eval=lambda trained: evaluate_stages(trained, cfg.solver.eval_images)[0])
    start = time.perf_counter()
    metrics, detections = evaluate_stages(model, cfg.data.max_val_images, cfg.data.num_workers)
    metrics.update(iterations=result.iterations, train_time_s=result.train_time_s,
                   eval_time_s=time.perf_counter() - start, eval_protocol=EVAL_PROTOCOL)
    if distributed.rank() == 0:
        atomic_write_json(output_dir / "detections.json", detections)
        atomic_write_json(output_dir / "metrics.json", metrics)
        final = metrics["final"]
        log.info("final: mask AP %s, box AP %s (%d val images)", _fmt(final.get("mask_AP")), _fmt(final.get("box_AP")),
                 metrics["num_val_images"])
    distributed.barrier()
    return metrics


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def fit_pca_job(cfg: Config, output_dir: str | Path) -> dict[str, Any]:
    """Figure 1: the explained-variance ratio of all R*R principal components of the training masks.

    The PCA is an exact eigendecomposition, so the ratio of the first k components does not depend on
    how many are kept: the curve is read from the (cached) fit that training uses, which stores all R*R.
    """
    output_dir, _, log = _setup(cfg, output_dir)
    done = _read_metrics(output_dir)
    if done is not None:
        return done
    train_ds, _ = _build_datasets(cfg)
    codec = fit_or_load_pca(cfg, train_ds, log=log)
    metrics = {"explained_variance_ratio": [float(v) for v in codec.metadata["spectrum_ratio"]],
               "num_masks": int(codec.metadata["count"])}
    if distributed.rank() == 0:
        atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_json(output_dir / "metrics.json", metrics)
    return metrics
