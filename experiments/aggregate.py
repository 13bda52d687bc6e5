"""Result directories -> DataFrames in the layout of ``registry.get(name).reference``.

``collect(name, scale, results_root)`` reads, for every runnable variant, the planned seeds
(``Entry.num_seeds``) and any further consecutive seeds already complete in the store (a run with
``--seeds 5`` is picked up without being told). Per cell it gives:

    mean   the mean over seeds (``measured()`` returns this frame)
    std    the sample standard deviation (ddof=1); NaN with fewer than 2 seeds
    min    max    count (seeds that produced the cell)

COCOeval writes -1 for an AP with no ground truth in its size range: read as NaN.
Rows of reported-only variants and of missing results stay NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from experiments import jobs, registry, store


@dataclass
class Aggregate:
    entry: registry.Entry
    scale: str
    mean: pd.DataFrame
    std: pd.DataFrame
    min: pd.DataFrame
    max: pd.DataFrame
    count: pd.DataFrame
    # one per complete job: label, seed, hash, wall_s (the last attempt), wall_s_total and attempts (over the
    # attempts run.json recorded), wall_s_unrecorded (attempts killed before they could write their wall time, so
    # wall_s_total is a lower bound), commits (of every attempt), train_s (training time summed over resumed
    # attempts), host, cpu, versions
    runs: list[dict[str, Any]]
    missing: list[str]  # "label/seed<i>" planned but not complete
    planned: list[str] = field(default_factory=list)  # hash of every planned job, complete or not
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. fig1: per-seed explained_variance_ratio curves

    def spread(self) -> pd.DataFrame:
        """One frame: columns (metric, stat) for stat in mean, std, min, max, count."""
        stats = {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max, "count": self.count}
        frame = pd.concat(stats, axis=1).swaplevel(0, 1, axis=1)
        return frame.reindex(columns=pd.MultiIndex.from_product([self.entry.columns, list(stats)]))


def rows_from_metrics(entry: registry.Entry, metrics: dict[str, Any], label: str, cfg) -> dict[str, dict[str, float]]:
    """The entry's cells that one job's metrics.json fills: {row: {metric: value}}."""
    if entry.kind == "final":
        return {label: {c: _number(metrics["final"].get(c)) for c in entry.measured_columns}}
    if entry.kind == "top":
        return {label: {c: _number(metrics.get(c)) for c in entry.measured_columns}}
    if entry.kind == "stages":
        stages = metrics["stages"]
        return {r: {c: _number(stages.get(r.split()[-1], {}).get(c)) for c in entry.measured_columns}
                for r in entry.row_labels(cfg)}
    cumulative = np.cumsum(np.asarray(metrics["explained_variance_ratio"], dtype=float))
    out = {}
    for row in entry.rows:
        k = int(row.split("=")[-1])
        out[row] = {"explained_variance": float(cumulative[k - 1]) if k <= len(cumulative) else math.nan}
    return out


def collect(name: str, scale: str, results_root: str | Path, seeds: Optional[int] = None,
            overrides: Sequence[str] = ()) -> Aggregate:
    entry = registry.get(name)
    samples: dict[str, list[dict[str, float]]] = {row: [] for row in entry.rows}
    runs, missing, curves, planned = [], [], [], []
    for variant in entry.runnable():
        planned_seeds = entry.num_seeds(variant.label, scale, seeds)
        seed_index = 0
        while True:
            cfg, _, digest = jobs.for_variant(entry, variant.label, scale, overrides, seed_index)
            directory = store.result_dir(results_root, digest)
            metrics = store.read_metrics(directory)
            complete = metrics is not None and not store.missing_keys(metrics, entry.required_keys(cfg, variant.label))
            if complete or seed_index < planned_seeds:
                planned.append(digest)
            if not complete:
                if seed_index >= planned_seeds:
                    break
                missing.append(f"{variant.label}/seed{seed_index}")
                seed_index += 1
                continue
            for row, values in rows_from_metrics(entry, metrics, variant.label, cfg).items():
                samples[row].append(values)
            if entry.kind == "pca":
                curves.append(list(metrics["explained_variance_ratio"]))
            run = store.read_json(directory / "run.json") or {}
            attempts = [*run.get("attempts", []), run]
            walls = [a["wall_s"] for a in attempts if isinstance(a.get("wall_s"), (int, float))]
            runs.append({"label": variant.label, "seed": seed_index, "hash": digest, "wall_s": run.get("wall_s"),
                         "wall_s_total": sum(walls) if walls else None, "attempts": len(attempts),
                         "wall_s_unrecorded": len(attempts) - len(walls),
                         "train_s": metrics.get("train_time_s"),
                         "adopted_from": next((a["adopted_from"] for a in attempts if a.get("adopted_from")), None),
                         "commits": sorted({str(a["git_commit"]) for a in attempts if a.get("git_commit")}),
                         **{k: run.get(k) for k in ("host", "cpu", "cpu_count", "cpu_native_bf16", "torch", "torchvision", "git_commit", "end")}})
            seed_index += 1
    frames = {stat: _frame(entry, samples, stat) for stat in ("mean", "std", "min", "max", "count")}
    return Aggregate(entry, scale, runs=runs, missing=missing, planned=planned, extras={"explained_variance_ratio": curves}, **frames)


def measured(name: str, scale: str, results_root: str | Path, **kwargs) -> pd.DataFrame:
    """Mean over seeds, in exactly the layout of ``registry.get(name).reference`` (NaN = not measured)."""
    return collect(name, scale, results_root, **kwargs).mean


def spread(name: str, scale: str, results_root: str | Path, **kwargs) -> pd.DataFrame:
    """Columns (metric, stat), stat in mean / std / min / max / count."""
    return collect(name, scale, results_root, **kwargs).spread()


def _frame(entry: registry.Entry, samples: dict[str, list[dict[str, float]]], stat: str) -> pd.DataFrame:
    frame = entry.reference.copy()
    frame.loc[:, :] = math.nan
    for row, values in samples.items():
        for column in entry.columns:
            cells = np.array([v[column] for v in values if column in v and not math.isnan(v[column])], dtype=float)
            frame.loc[row, column] = _stat(cells, stat)
    return frame


def _stat(cells: np.ndarray, stat: str) -> float:
    if stat == "count":
        return float(len(cells))
    if len(cells) == 0 or (stat == "std" and len(cells) < 2):
        return math.nan
    if stat == "std":
        return float(np.std(cells, ddof=1))
    return float(getattr(np, stat)(cells))


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return math.nan if value < 0 else float(value)  # COCOeval: -1 = no ground truth in this range
