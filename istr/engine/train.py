"""The training loop: iteration-based, resumable, deterministic on CPU, DDP-aware.

One iteration: a global batch of ``cfg.solver.batch_size`` images split over the ranks, the model's
already-weighted loss terms summed, backward (DDP averages gradients; the criterion normalises by the
all-reduced GT count, so the sum equals the one-process loss), full-model grad-norm clipping, AdamW,
lr schedule. A non-finite loss stops the run before the optimizer step (the last checkpoint stays good).

Stopping: Ctrl-C, or SIGTERM where the entry point turns it into SystemExit (``istr.train``, ``experiments.run``,
submitit's preemption handler), saves ``checkpoints/last.pth`` at the last completed iteration before the
exception goes on (with the RNG states and buffers, e.g. BatchNorm statistics, as that iteration left them), so
the same command resumes where the run stopped rather than at the last periodic checkpoint. Only a stop inside the
parameter update itself (clipping, optimizer and lr steps) falls back to that one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from istr.config import Config, to_dict
from istr.engine import distributed
from istr.engine.checkpoint import (FINAL, LAST, CheckpointError, atomic_save, atomic_write_text, buffer_snapshot,
                                    load_checkpoint, restore_buffers, rng_state, set_rng_state, signals_ignored)
from istr.engine.cpu_bf16 import bf16_products_in_fp32
from istr.engine.precision import autocast
from istr.engine.profiling import StepProfiler
from istr.engine.sampling import IterationBatchSampler, SeededDataset
from istr.engine.schedule import build_optimizer, build_scheduler
from istr.models.fast import to_channels_last


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss; the message is one line naming the iteration and the loss terms."""


@dataclass
class TrainResult:
    iterations: int
    train_time_s: float


def collate(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    return [item[0] for item in batch], [item[1] for item in batch]


def _to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run logs past it)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("iteration", 0) <= last_iteration]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _format_losses(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def _reduced_losses(losses: dict[str, torch.Tensor], iteration: int, device: torch.device,
                    checkpoint: Path) -> dict[str, float]:
    """``{"loss": total, term: value, ...}`` averaged over ranks; raises on a non-finite value."""
    local = torch.stack([v.detach().float() for v in losses.values()]).tolist()
    values = distributed.all_reduce_mean(dict(zip(losses, local)), device)
    values = {"loss": sum(values.values()), **values}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration + 1}: {_format_losses(bad)}; training "
                                 f"stopped, last good checkpoint kept ({checkpoint})")
    return values


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler], params: list,
                    clip: float, iteration: int, values: dict[str, float]) -> None:
    """Full-model grad-norm clipping then the optimizer step (GradScaler skips fp16 overflow steps itself)."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if scaler is None and not math.isfinite(float(grad_norm)):
        raise NonFiniteLossError(f"non-finite gradient norm at iteration {iteration + 1} (losses: "
                                 f"{_format_losses(values)}); training stopped, last good checkpoint kept")
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


PeriodicEval = Callable[[nn.Module], dict[str, Any]]  # model -> {"stages": {"1": {metric: value}, ...}}


def _curve_has(curve: Path, iteration: int) -> bool:
    return curve.exists() and any(json.loads(line).get("iteration") == iteration
                                  for line in curve.read_text().splitlines() if line.strip())


def _evaluate_now(model: nn.Module, periodic_eval: PeriodicEval, curve: Optional[Path], iteration: int,
                  train_time: float, log: logging.Logger) -> None:
    """One learning-curve point; the model goes back to training mode afterwards."""
    state = rng_state()  # evaluation must not move the training's random streams
    model.eval()
    try:
        metrics = periodic_eval(model)
    finally:
        model.train()
        set_rng_state(state)
    if curve is not None:
        stages = metrics.get("stages", {})
        with open(curve, "a") as handle:
            handle.write(json.dumps({"iteration": iteration, "train_time_s": round(train_time, 2), "stages": stages}) + "\n")
        last = stages.get(max(stages, key=int)) if stages else {}
        log.info("iteration %d: mask AP %s, box AP %s (learning curve)", iteration, last.get("mask_AP"), last.get("box_AP"))


def train(model: nn.Module, dataset: Dataset, cfg: Config, output_dir: str | Path, device: torch.device,
          log: Optional[logging.Logger] = None, profile_iters: int = 0,
          periodic_eval: Optional[PeriodicEval] = None) -> TrainResult:
    """Train ``model`` on ``dataset`` to ``cfg.solver.max_iter``, resuming from ``checkpoints/last.pth``.

    Writes ``metrics.jsonl`` and ``checkpoints/{last,final}.pth`` under ``output_dir`` (rank 0); with
    ``solver.eval_period > 0`` and ``periodic_eval`` also ``learning_curve.jsonl``: one line per evaluation
    (``iteration``, ``train_time_s``, ``stages``), called on every rank, the model in eval mode meanwhile.
    With ``profile_iters > 0`` runs 1 + ``profile_iters`` iterations from the current state instead,
    writes nothing and logs the time breakdown of the last ``profile_iters``.
    """
    log = log or logging.getLogger("istr.train")
    solver = cfg.solver
    output_dir, rank, world = Path(output_dir), distributed.rank(), distributed.world_size()
    ckpt_dir, jsonl, curve = output_dir / "checkpoints", output_dir / "metrics.jsonl", output_dir / "learning_curve.jsonl"
    is_main, writing = rank == 0, profile_iters == 0

    model.to(device)
    if solver.channels_last:
        to_channels_last(model)
    model.train()
    optimizer = build_optimizer(model, solver)
    scheduler = build_scheduler(optimizer, solver)
    scaler = torch.amp.GradScaler("cuda") if solver.amp == "fp16" else None
    start_iter, train_time = 0, 0.0
    if (ckpt_dir / LAST).exists():
        try:
            ckpt = load_checkpoint(ckpt_dir / LAST, map_location=device)
        except CheckpointError as err:  # the only resume point: without it the run starts over
            raise CheckpointError(f"{err}; delete it to start this run over from iteration 0") from None
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_iter, train_time = int(ckpt["iteration"]), float(ckpt.get("train_time_s", 0.0))
        rng = ckpt.get("rng", [])
        if len(rng) == world:
            set_rng_state(rng[rank])
        else:  # resumed with another number of processes: fresh, still seeded, streams
            torch.manual_seed(cfg.seed + rank + start_iter)
        log.info("resumed from %s at iteration %d", ckpt_dir / LAST, start_iter)
    else:
        torch.manual_seed(cfg.seed + rank)
    end_iter = start_iter + 1 + profile_iters if profile_iters else solver.max_iter
    if is_main and writing:
        output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(jsonl, start_iter)
        _truncate_jsonl(curve, start_iter)
    # what a checkpoint alone needs to rebuild and evaluate its model
    identity = {"config": to_dict(cfg), "label_to_category_id": list(getattr(dataset, "label_to_category_id", []))}

    def save_last(iteration: int, rng: list, elapsed: float) -> None:
        atomic_save({**identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "iteration": iteration, "train_time_s": elapsed, "rng": rng}, ckpt_dir / LAST)

    def eval_due(done: int) -> bool:
        return bool(writing and periodic_eval and solver.eval_period > 0 and done % solver.eval_period == 0)

    # a run stopped during a learning-curve point resumes from the checkpoint written just before it: evaluate it now
    if start_iter > 0 and eval_due(start_iter) and distributed.broadcast_object(is_main and not _curve_has(curve, start_iter)):
        _evaluate_now(model, periodic_eval, curve if is_main else None, start_iter, train_time, log)
    if start_iter >= end_iter:  # finished before (killed during evaluation, say)
        if is_main and not (ckpt_dir / FINAL).exists():
            atomic_save({**identity, "model": model.state_dict(), "iteration": start_iter}, ckpt_dir / FINAL)
        return TrainResult(start_iter, train_time)

    train_model = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=True)
    sampler = IterationBatchSampler(len(dataset), solver.batch_size, cfg.seed, rank, world, start_iter)
    # own generator: creating the loader's iterator must not draw from the global RNG that the model uses
    loader = DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)
    profiler = StepProfiler(model, device) if profile_iters else None
    params = [p for p in model.parameters() if p.requires_grad]
    products = bf16_products_in_fp32(solver.amp, device)  # entered for each forward and backward
    window_start, window_data, window_iters = time.perf_counter(), 0.0, 0
    progress = tqdm(total=end_iter, initial=start_iter, disable=not is_main, desc="train", dynamic_ncols=True)

    def timed(name: str):
        return profiler.section(name) if profiler else contextlib.nullcontext()

    # the last completed iteration, this rank's RNG state, the training time and the buffers then: what a stop saves
    completed, updating, saved = (start_iter, rng_state(), train_time, buffer_snapshot(model)), False, start_iter
    try:
        for iteration in range(start_iter, end_iter):
            if profiler and iteration == start_iter + 1:
                profiler.reset()  # the first iteration warms up allocators and caches
            step_start = time.perf_counter()
            with timed("data"):
                images, targets = next(batches)
                images = [image.to(device, non_blocking=True) for image in images]
                targets = [_to_device(t, device) for t in targets]
            data_time = time.perf_counter() - step_start
            with timed("forward"), autocast(device, solver.amp), products:
                losses = train_model(images, targets)
            values = _reduced_losses(losses, iteration, device, ckpt_dir / LAST)
            with timed("backward"), products:
                total = sum(losses.values())
                (scaler.scale(total) if scaler else total).backward()
            lr = optimizer.param_groups[0]["lr"]
            with timed("optimizer"):
                updating = True
                _optimizer_step(optimizer, scaler, params, solver.clip_grad_norm, iteration, values)
                scheduler.step()
                done = iteration + 1
                train_time += time.perf_counter() - step_start
                completed = (done, rng_state(), train_time, buffer_snapshot(model))
                updating = False
            if profiler:
                profiler.step()
            window_data, window_iters = window_data + data_time, window_iters + 1
            progress.update(1)
            if writing and (done % solver.log_period == 0 or done == end_iter):
                elapsed = time.perf_counter() - window_start
                record = {"iteration": done, "lr": lr, **values, "time_s": elapsed / window_iters,
                          "data_time_s": window_data / window_iters}
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                if is_main:
                    with open(jsonl, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    log.info("iter %d/%d  loss %.4f  lr %.3g  %.3f s/it", done, end_iter, values["loss"], lr,
                             record["time_s"])
                window_start, window_data, window_iters = time.perf_counter(), 0.0, 0
            if writing and (done % solver.checkpoint_period == 0 or done == end_iter):
                # before the learning-curve point (see the resume above)
                states = distributed.all_gather_objects(rng_state())
                if is_main:
                    save_last(done, states, train_time)
                    saved = done
                distributed.barrier()
            if eval_due(done):
                _evaluate_now(model, periodic_eval, curve if is_main else None, done, train_time, log)
    except (KeyboardInterrupt, SystemExit):
        if writing and is_main and not updating and completed[0] > saved:
            restore_buffers(model, completed[3])
            # other ranks' RNG states are not known here: with several processes the resume draws fresh streams
            with signals_ignored():
                save_last(completed[0], [completed[1]] if world == 1 else [], completed[2])
            log.info("stopped after iteration %d: saved %s; the same command resumes from there",
                     completed[0], ckpt_dir / LAST)
        raise
    finally:
        progress.close()
        if profiler:
            profiler.close()
    if profiler:
        log.info("time per iteration (%s, batch %d per process):\n%s", device, solver.batch_size // world,
                 profiler.table())
    elif is_main:
        atomic_save({**identity, "model": model.state_dict(), "iteration": end_iter}, ckpt_dir / FINAL)
    return TrainResult(end_iter, train_time)
