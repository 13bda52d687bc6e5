"""Backbone pretraining on the training split: the offline stand-in for ImageNet weights.

The paper starts its ResNet from ImageNet classification weights, which cannot be downloaded here. The
closest substitute is the same task on the data we have: classify object crops (each ground-truth box
with some context, resized to ``crop_size``) into the dataset's categories plus one "background" class
drawn from crops that overlap no object. Only the ResNet trunk is kept; it is saved as a torchvision
ResNet state dict and loaded by the detector exactly like any local weights file
(``model.backbone.weights``). The result is cached by a hash of everything it depends on, so every
variant of a table shares one pretraining run. A stopped pretraining resumes: its state is saved every
``CHECKPOINT_PERIOD`` iterations and, on Ctrl-C or SIGTERM, at the last completed one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from filelock import FileLock
from torchvision.ops import box_iou, roi_align
from tqdm import tqdm

from istr.config import Config, to_dict
from istr.engine.checkpoint import atomic_save, buffer_snapshot, load_checkpoint, restore_buffers, signals_ignored
from istr.engine.cpu_bf16 import bf16_products_in_fp32
from istr.engine.precision import autocast

log = logging.getLogger("istr.run.pretrain")  # a child of the job logger: console + log.txt

CROP_SIZE = 64
CONTEXT = 1.2  # crop = box enlarged by this factor around its centre
CHECKPOINT_PERIOD = 250  # iterations between saved training states (~3 min at smoke on a 2-core CPU)


def pretrain_key(cfg: Config, train_dataset) -> str:
    """Hash of what the pretrained weights depend on: training data, backbone, pretraining settings."""
    from istr.engine.job import dataset_identity

    identity = {
        "data": dataset_identity(train_dataset),
        "backbone": cfg.model.backbone.name,
        "pretrain": to_dict(cfg.pretrain),
        "pixel_mean_std": [cfg.model.pixel_mean, cfg.model.pixel_std],
        "amp": cfg.solver.amp,
        "crop": [CROP_SIZE, CONTEXT],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def collect_crops(dataset, generator: torch.Generator, background_per_image: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Object and background crops of every image of ``dataset``.

    Returns:
        crops:  uint8 [M, 3, CROP_SIZE, CROP_SIZE]
        labels: int64 [M], dataset labels 0..C-1 for objects, C for background
    """
    crops, labels = [], []
    for index in tqdm(range(len(dataset)), desc="pretrain crops", unit="img", mininterval=2):
        image, target = dataset[index]
        h, w = image.shape[-2:]
        boxes = target["boxes"].float()
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        half = (boxes[:, 2:] - boxes[:, :2]).clamp(min=4) * CONTEXT / 2
        windows = torch.cat([centre - half, centre + half], dim=1)
        # background windows: random squares that barely touch any object
        side = torch.empty(4 * background_per_image).uniform_(0.15, 0.4, generator=generator) * min(h, w)
        x0 = torch.rand(side.shape, generator=generator) * (w - side)
        y0 = torch.rand(side.shape, generator=generator) * (h - side)
        candidates = torch.stack([x0, y0, x0 + side, y0 + side], dim=1)
        if len(boxes):
            free = box_iou(candidates, boxes).max(dim=1).values < 0.05
            candidates = candidates[free]
        candidates = candidates[:background_per_image]
        all_windows = torch.cat([windows, candidates])
        pooled = roi_align(image[None].float(), [all_windows], output_size=CROP_SIZE, aligned=True)
        crops.append(pooled.round().clamp(0, 255).to(torch.uint8))
        labels.append(torch.cat([target["labels"], torch.full((len(candidates),), -1, dtype=torch.int64)]))
    return torch.cat(crops), torch.cat(labels)


def train_classifier(cfg: Config, crops: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     device: torch.device = torch.device("cpu"), state_path: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """Train ``cfg.model.backbone.name`` on the crops on ``device``; return the trunk's state dict (no ``fc``),
    on the CPU. ``labels`` of -1 (background) become class ``num_classes``. The crops stay on the CPU and the
    random draws on a CPU generator, so the batches are the same on every device.

    With ``state_path`` the training state (network, optimizer, schedule, generator) is saved there every
    ``CHECKPOINT_PERIOD`` iterations and when Ctrl-C or SIGTERM stops it, and a call that finds it continues
    from it: the same weights as an uninterrupted run.
    """
    generator = torch.Generator().manual_seed(cfg.pretrain.seed)
    torch.manual_seed(cfg.pretrain.seed)
    net = getattr(torchvision.models, cfg.model.backbone.name)(weights=None, num_classes=num_classes + 1)
    net = net.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.pretrain.lr, weight_decay=1e-4)
    total = cfg.pretrain.max_iter
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.pretrain.lr, total_steps=total, pct_start=0.1)
    mean = torch.tensor(cfg.model.pixel_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.pixel_std, device=device).view(1, 3, 1, 1)
    targets = torch.where(labels < 0, torch.full_like(labels, num_classes), labels).to(device)
    first = 0
    if state_path is not None and state_path.exists():
        state = load_checkpoint(state_path, map_location=device)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        first = int(state["iteration"])
        log.info("pretrain: resumed from %s at iteration %d", state_path, first)

    def save(iteration: int, generator_state: torch.Tensor) -> None:
        atomic_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "generator": generator_state, "iteration": iteration}, state_path)

    net.train()
    start, correct, seen = time.time(), 0, 0
    amp = "bf16" if cfg.solver.amp == "bf16" else "none"  # an fp16 job's trunk trains in fp32: no loss scaler here
    products = bf16_products_in_fp32(amp, device)  # entered for each forward and backward
    completed, updating = (first, generator.get_state(), buffer_snapshot(net)), False  # what a stop saves
    try:
        for step in tqdm(range(first, total), initial=first, total=total, desc="pretrain", unit="it", mininterval=2):
            index = torch.randint(len(crops), (cfg.pretrain.batch_size,), generator=generator)
            x = crops[index].float()
            flip = torch.rand(len(x), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            x, index = x.to(device, non_blocking=True), index.to(device)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with autocast(device, amp), products:
                logits = net(x)
            loss = F.cross_entropy(logits.float(), targets[index])
            optimizer.zero_grad(set_to_none=True)
            with products:
                loss.backward()
            updating = True
            optimizer.step()
            schedule.step()
            completed = (step + 1, generator.get_state(), buffer_snapshot(net))
            updating = False
            correct = correct + (logits.argmax(1) == targets[index]).sum()  # a tensor: no device sync per step
            seen += len(x)
            if (step + 1) % 50 == 0 or step + 1 == total:
                log.info("pretrain %d/%d loss %.3f acc %.3f (%.1f s)", step + 1, total, loss.item(), int(correct) / seen, time.time() - start)
                correct, seen = 0, 0
            if state_path is not None and (step + 1) % CHECKPOINT_PERIOD == 0 and step + 1 < total:
                save(*completed[:2])
    except (KeyboardInterrupt, SystemExit):
        if state_path is not None and not updating and completed[0] > first:
            restore_buffers(net, completed[2])  # the stopped forward moved BatchNorm's running statistics
            with signals_ignored():
                save(*completed[:2])
            log.info("pretrain: stopped after iteration %d, saved %s; the same command resumes from there",
                     completed[0], state_path)
        raise
    return {k: v.cpu() for k, v in net.state_dict().items() if not k.startswith("fc.")}


def pretrained_backbone_path(cfg: Config, train_dataset) -> Path:
    """Where the trunk of ``cfg`` pretrained on ``train_dataset`` is cached (it may not exist yet)."""
    return Path(cfg.data.cache_dir) / f"pretrain-{pretrain_key(cfg, train_dataset)}" / "backbone.pth"


def ensure_pretrained_backbone(cfg: Config, train_dataset=None) -> str:
    """Path of the pretrained trunk for ``cfg``; trains it once when it is not cached.

    ``train_dataset`` yields un-augmented ``(image [3,H,W] 0..255, target)`` pairs; built from ``cfg`` when None.
    Concurrent jobs (a SLURM array) wait on a file lock, so the trunk is trained by one of them only.
    """
    from istr.engine.job import resolve_device

    if train_dataset is None:
        from istr.data import build_datasets

        train_dataset, _ = build_datasets(cfg, train_transforms=False)
    weights = pretrained_backbone_path(cfg, train_dataset)
    out_dir = weights.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / ".lock")):
        if weights.exists():
            return str(weights)
        start, state_path = time.time(), out_dir / "train_state.pth"
        resumed = state_path.exists()
        crops, labels = collect_crops(train_dataset, torch.Generator().manual_seed(cfg.pretrain.seed))
        num_classes = int(train_dataset.num_classes)
        log.info("pretrain: %d crops (%d background) from %d images", len(crops), int((labels < 0).sum()), len(train_dataset))
        state = train_classifier(cfg, crops, labels, num_classes, resolve_device(cfg), state_path)
        tmp = weights.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, weights)
        state_path.unlink(missing_ok=True)
        # "seconds" of this call only: a resumed pretraining's earlier attempts are not in it
        info = {"crops": len(crops), "iterations": cfg.pretrain.max_iter, "seconds": round(time.time() - start, 1),
                "resumed": resumed}
        (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return str(weights)
