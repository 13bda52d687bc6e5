"""Measured wall-time estimates of the jobs a plan would run: ``python -m experiments.run NAME --estimate``.

For each training job still to run, a few training iterations and a few evaluated val images are timed on this
machine, in the job's own config (threads, precision, device; the trunk's weights do not change the speed, so
no pretraining is done for it), and scaled by its schedule: ``solver.max_iter`` iterations, a learning-curve
point of ``solver.eval_images`` images every ``solver.eval_period`` iterations, the final evaluation of every
val image (``data.max_val_images``). A job that resumes counts only its iterations still to do. An uncached
trunk pretraining is timed the same way and counted once: every job shares it. Timings on shared machines are
noisy; this is for planning (laptop or cluster?), not a benchmark.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

# runner -> the model factory its job uses (istr.engine.job.ModelFactory); other runners take seconds
MODEL_FACTORIES = {"istr": "istr.engine.job:build_istr", "maskrcnn": "baselines.maskrcnn:build"}


@dataclass
class JobEstimate:
    digest: str
    use: str
    step_s: float
    iterations: int  # still to train
    eval_points: int  # learning-curve points still to come
    eval_images: int  # per point
    val_images: int  # final evaluation
    eval_s_per_image: float
    eval_fixed_s: float  # per evaluation, whatever its size (COCOeval set-up, 2 tasks x stages)

    @property
    def training_s(self) -> float:
        return self.step_s * self.iterations

    @property
    def evaluation_s(self) -> float:
        images = self.eval_points * self.eval_images + self.val_images
        return self.eval_s_per_image * images + self.eval_fixed_s * (self.eval_points + 1)

    @property
    def total_s(self) -> float:
        return self.training_s + self.evaluation_s


def _factory(runner: str) -> Callable[..., Any]:
    import importlib

    module, name = MODEL_FACTORIES[runner].split(":")
    return getattr(importlib.import_module(module), name)


def _completed_iterations(directory: Path) -> int:
    """Iterations a partial job has already trained (its last checkpoint), 0 when none."""
    from istr.engine.checkpoint import LAST, CheckpointError, load_checkpoint

    try:
        return int(load_checkpoint(directory / "checkpoints" / LAST)["iteration"])
    except (CheckpointError, KeyError, ValueError):
        return 0


def _timed(fn: Callable[[], Any], device) -> float:
    from istr.engine.latency import synchronizer

    sync = synchronizer(device)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure_job(cfg, runner: str, steps: int = 5, warmup: int = 1, eval_images: Sequence[int] = (4, 12)) -> dict[str, Any]:
    """Seconds per training iteration (median of ``steps`` after ``warmup``) and of evaluation (all stages, COCOeval
    included) as a fixed part plus a part per image, from evaluations of two sizes, of the job of ``cfg``, built as
    its runner builds it, without pretraining. Also the number of val images. The evaluation is of the untrained
    model, so it is a low estimate: ISTR drops boxes that fall outside the image, and untrained it keeps ~47 of its
    top 100 per image (Table 1b's L1 job on 4 val images: 186 detections, 400 from its final checkpoint, which took
    17% longer per image); Mask R-CNN's count depends on how many detections pass its score threshold."""
    import statistics

    import torch

    from torch.utils.data import DataLoader

    from baselines.latency import train_step
    from istr.data import collate
    from istr.engine.cpu_bf16 import bf16_products_in_fp32
    from istr.engine.evaluate import evaluate
    from istr.engine.job import prepare, resolve_device
    from istr.engine.sampling import IterationBatchSampler, SeededDataset
    from istr.engine.schedule import build_optimizer

    cfg = copy.deepcopy(cfg)
    cfg.pretrain.enabled = False
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg)
    cfg, train_ds, val_ds, model = prepare(cfg, logging.getLogger("istr.estimate"), _factory(runner))
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.solver)
    products = bf16_products_in_fp32(cfg.solver.amp, device)
    # the training loop's own data pipeline: its worker processes share the CPU with the step
    loader = DataLoader(SeededDataset(train_ds), batch_sampler=IterationBatchSampler(len(train_ds), cfg.solver.batch_size,
                                                                                     cfg.seed), num_workers=cfg.data.num_workers, collate_fn=collate)
    batches, times = iter(loader), []

    def step() -> None:
        images, targets = next(batches)
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        train_step(model, optimizer, images, targets, cfg.solver, products, device.type)

    for i in range(warmup + steps):
        seconds = _timed(step, device)
        if i >= warmup:
            times.append(seconds)
    del batches  # stops the workers
    small, large = (min(n, len(val_ds)) for n in eval_images)
    # as the job evaluates (istr.engine.job): in fp32 whatever solver.amp
    small_s, large_s = (_timed(lambda: evaluate(model, val_ds, device, max_images=n, mask_threshold=cfg.model.mask_threshold,
                                                all_stages=cfg.eval_all_stages), device) for n in (small, large))
    per_image = max(0.0, (large_s - small_s) / (large - small)) if large > small else large_s / large
    return {"step_s": statistics.median(times), "eval_s_per_image": per_image,
            "eval_fixed_s": max(0.0, small_s - small * per_image), "val_images": len(val_ds),
            "device": str(device), "threads": torch.get_num_threads()}


def measure_pretraining(cfg, train_ds, steps: Sequence[int] = (2, 5)) -> float:
    """Seconds of the whole trunk pretraining of ``cfg`` on this machine: classifier runs of two lengths on random
    crops (their difference is the steady per-iteration time, without set-up and warm-up), scaled to
    ``pretrain.max_iter``, plus the crop collection timed on 20 training images and scaled to the training set."""
    import torch

    from istr.engine.job import resolve_device
    from istr.engine.pretrain import CROP_SIZE, collect_crops, train_classifier

    sample = torch.utils.data.Subset(train_ds, range(min(20, len(train_ds))))
    crop_s = _timed(lambda: collect_crops(sample, torch.Generator().manual_seed(0)), torch.device("cpu"))
    crops = torch.randint(0, 256, (cfg.pretrain.batch_size, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)
    labels = torch.randint(-1, int(train_ds.num_classes), (len(crops),))
    device = resolve_device(cfg)

    def run(iterations: int) -> float:
        short = copy.deepcopy(cfg)
        short.pretrain.max_iter = iterations
        return _timed(lambda: train_classifier(short, crops, labels, int(train_ds.num_classes), device), device)

    first, second = (run(n) for n in steps)
    per_step = max(0.0, second - first) / (steps[1] - steps[0])
    return per_step * cfg.pretrain.max_iter + crop_s * len(train_ds) / len(sample)


def _uncached_trunk(cfg) -> Optional[tuple[Path, Any]]:
    """Where the trunk ``cfg`` pretrains would be cached and the un-augmented training set it pretrains on, when it
    has to be pretrained and is not there yet."""
    from istr.data import build_datasets
    from istr.engine.pretrain import pretrained_backbone_path

    if not cfg.pretrain.enabled:
        return None
    train_ds, _ = build_datasets(cfg, train_transforms=False)
    path = pretrained_backbone_path(cfg, train_ds)
    return None if path.exists() else (path, train_ds)


def estimate(jobs_: Sequence[Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Estimates of the planned jobs to run (``experiments.run.PlannedJob`` with state != "cached"): one measurement per
    distinct config apart from the seed. Returns {"jobs": [JobEstimate], "pretraining_s", "not_estimated": [use]}."""
    from istr.config import from_dict, to_dict

    measured: dict[str, dict[str, Any]] = {}
    estimates, skipped, pretraining_s = [], [], 0.0
    trunks: set[Path] = set()
    for job in jobs_:
        if job.state == "cached":
            continue
        runner = job.spec["runner"]
        if runner not in MODEL_FACTORIES:
            skipped.append(job.uses[0])
            continue
        cfg = from_dict(job.spec["config"])
        if job.state == "stale":  # trained already: only its final evaluation is redone
            cfg.solver.max_iter, cfg.solver.eval_period = 0, 0
        key = json.dumps({**to_dict(cfg), "seed": None}, sort_keys=True, default=list)  # seeds train at one speed
        if key not in measured:
            log(f"measuring {job.uses[0]} ({runner}) ...")
            measured[key] = measure_job(cfg, runner)
        m = measured[key]
        done = _completed_iterations(job.directory)
        todo = max(0, cfg.solver.max_iter - done)
        period = cfg.solver.eval_period
        points = (cfg.solver.max_iter // period - done // period) if period > 0 else 0
        val_images = min(m["val_images"], cfg.data.max_val_images or m["val_images"])
        estimates.append(JobEstimate(job.digest, job.uses[0], m["step_s"], todo, points, cfg.solver.eval_images,
                                     val_images, m["eval_s_per_image"], m["eval_fixed_s"]))
        trunk = _uncached_trunk(cfg) if todo else None
        if trunk is not None and trunk[0] not in trunks:
            trunks.add(trunk[0])
            log("measuring the trunk pretraining ...")
            pretraining_s += measure_pretraining(cfg, trunk[1])
    return {"jobs": estimates, "pretraining_s": pretraining_s, "not_estimated": skipped,
            "device": next(iter(measured.values()))["device"] if measured else None,
            "threads": next(iter(measured.values()))["threads"] if measured else None}


def duration(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def format_estimate(result: dict[str, Any], executor: str) -> str:
    from istr.engine.hardware import cpu_model

    lines = [f"estimate for this machine ({cpu_model()}, {result['device']}, {result['threads']} threads), "
             "from a few timed iterations and val images per job:"]
    for e in result["jobs"]:
        lines.append(f"  {e.digest}  {e.use}: {e.iterations} it x {e.step_s:.2f} s = {duration(e.training_s)}, "
                     f"evaluation {duration(e.evaluation_s)} ({e.eval_points} learning-curve points of {e.eval_images} "
                     f"images, final {e.val_images} images) -> {duration(e.total_s)}")
    if result["pretraining_s"]:
        lines.append(f"  trunk pretraining (not cached; once, shared by the jobs): {duration(result['pretraining_s'])}")
    for use in result["not_estimated"]:
        lines.append(f"  {use}: not estimated (not a training job; seconds to minutes)")
    totals = [e.total_s for e in result["jobs"]]
    one_by_one = sum(totals) + result["pretraining_s"]
    if executor == "slurm" and totals:
        lines.append(f"total: {duration(max(totals) + result['pretraining_s'])} with the jobs side by side on a cluster of "
                     f"machines like this one ({duration(one_by_one)} one after another)")
    else:
        lines.append(f"total: {duration(one_by_one)} for {len(totals)} job(s) one after another")
    return "\n".join(lines)


def describe(jobs_: Sequence[Any], executor: str, log: Callable[[str], None] = print) -> str:
    return format_estimate(estimate(jobs_, log), executor)
