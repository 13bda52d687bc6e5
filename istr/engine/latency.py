"""Inference latency protocol, independent of any model or harness.

Protocol: batch 1; eval mode under ``torch.inference_mode``; ``warmup`` untimed calls per model; then
``runs`` rounds, each timing every model once on the same image, the order alternating ABBA so a drift in
machine load hits all models alike; ``torch.cuda.synchronize`` around every timed region on GPU. Each call's
wall time is split into named parts (sub-modules or methods, e.g. backbone / head / post-processing) by
timing hooks; whatever the parts do not cover is "other". Summaries are medians and inter-quartile ranges.
"""
from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from istr.engine.hardware import cpu_model, native_bf16


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class PartTimer:
    """Accumulates the wall time spent in named parts of a model during one call.

    ``parts`` maps a label to one or several dotted attribute paths of the model: a sub-module (timed by
    forward pre/post hooks) or a method (temporarily wrapped on the instance). Parts must not nest.
    """

    def __init__(self, model: nn.Module, parts: dict[str, str | Sequence[str]], sync: Callable[[], None]):
        self.model, self.parts, self.sync = model, parts, sync
        self.totals: dict[str, float] = {}

    def reset(self) -> None:
        self.totals = {label: 0.0 for label in self.parts}

    @contextmanager
    def installed(self) -> Iterator["PartTimer"]:
        self.reset()
        handles, wrapped = [], []
        paths = [(label, p) for label, ps in self.parts.items() for p in ([ps] if isinstance(ps, str) else ps)]
        for label, path in paths:
            owner_path, _, attr = path.rpartition(".")
            owner = self.model.get_submodule(owner_path) if owner_path else self.model
            target = getattr(owner, attr, None)
            if isinstance(target, nn.Module):
                starts: list[float] = []
                handles.append(target.register_forward_pre_hook(self._pre_hook(starts)))
                handles.append(target.register_forward_hook(self._post_hook(label, starts)))
            elif callable(target):
                setattr(owner, attr, self._timed(label, target))
                wrapped.append((owner, attr))
            else:
                raise ValueError(f"latency part '{label}': '{path}' is neither a sub-module nor a method of {type(self.model).__name__}")
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for owner, attr in wrapped:
                delattr(owner, attr)  # the class method shows through again

    def _pre_hook(self, starts: list[float]):
        def hook(module, args):
            self.sync()
            starts.append(time.perf_counter())
        return hook

    def _post_hook(self, label: str, starts: list[float]):
        def hook(module, args, output):
            self.sync()
            self.totals[label] += time.perf_counter() - starts.pop()
        return hook

    def _timed(self, label: str, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self.sync()
            self.totals[label] += time.perf_counter() - start
            return out
        return timed


@dataclass
class LatencyCase:
    """One model to time: ``model([image])`` is the timed call."""

    name: str
    model: nn.Module
    parts: dict[str, str | Sequence[str]] = field(default_factory=dict)
    describe_output: Optional[Callable[[Any], dict[str, float]]] = None  # output -> e.g. {"detections": 100.0}


@dataclass
class LatencyResult:
    name: str
    times_s: list[float]
    parts_s: dict[str, list[float]]
    outputs: list[dict[str, float]]  # describe_output of each timed run

    def summary(self) -> dict:
        """Milliseconds: median, quartiles, IQR, FPS of the median, each part's median; means of describe_output."""
        q1, median, q3 = np.percentile(self.times_s, [25, 50, 75]) * 1e3
        parts = {label: float(np.median(v) * 1e3) for label, v in self.parts_s.items()}
        other = [t - sum(p[i] for p in self.parts_s.values()) for i, t in enumerate(self.times_s)]
        if self.parts_s:
            parts["other"] = float(np.median(other) * 1e3)
        out = {
            "time_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "fps": float(1e3 / median), "runs": len(self.times_s), "parts_ms": parts,
        }
        for key in (self.outputs[0] if self.outputs else {}):
            out[key] = float(np.mean([o[key] for o in self.outputs]))  # mean over the timed runs
        return out


def measure_latency(cases: Sequence[LatencyCase], images: Sequence[Tensor], *, warmup: int = 2, runs: int = 5,
                    device: torch.device | str = "cpu") -> dict[str, LatencyResult]:
    """Time every case on batch-1 inputs, interleaved; returns one result per case name.

    ``images`` are [3,H,W] tensors; round r uses ``images[r % len(images)]`` for every case.
    """
    if runs < 1 or warmup < 0 or not images:
        raise ValueError(f"measure_latency: need runs >= 1, warmup >= 0 and at least one image (got runs={runs}, warmup={warmup}, {len(images)} images)")
    device = torch.device(device)
    sync = synchronizer(device)
    images = [img.to(device) for img in images]
    results = {c.name: LatencyResult(c.name, [], {label: [] for label in c.parts}, []) for c in cases}
    timers = {c.name: PartTimer(c.model, c.parts, sync) for c in cases}
    progress = tqdm(total=len(cases) * (warmup + runs), desc="latency", unit="call", leave=False)
    for case in cases:
        case.model.eval()
        with torch.inference_mode():
            for i in range(warmup):
                case.model([images[i % len(images)]])
                progress.update()
    for r in range(runs):
        image = images[r % len(images)]
        for case in (cases if r % 2 == 0 else list(reversed(cases))):
            with timers[case.name].installed() as timer, torch.inference_mode():
                sync()
                start = time.perf_counter()
                output = case.model([image])
                sync()
                elapsed = time.perf_counter() - start
            result = results[case.name]
            result.times_s.append(elapsed)
            for label, total in timer.totals.items():
                result.parts_s[label].append(total)
            if case.describe_output is not None:
                result.outputs.append(case.describe_output(output))
            progress.update()
    progress.close()
    return results


def describe_environment(device: torch.device | str = "cpu") -> dict:
    """What a latency number depends on: hardware, threads, library versions, machine load."""
    device = torch.device(device)
    env = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "logical_cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the widest SIMD torch dispatches to
        "cpu_native_bf16": native_bf16(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "date": time.strftime("%Y-%m-%d"),  # cloud CPUs of one model name differ: the day tells two runs apart
    }
    if hasattr(os, "getloadavg"):
        env["load_average_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env

