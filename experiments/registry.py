"""The paper's experiments as data: one YAML file per entry under ``experiments/tables/``.

An entry (``get("table1c")``) names its variants (row label -> config overrides -> runner), the paper's
numbers (``entry.reference``, a DataFrame), and per-scale settings (preset, seeds, resources, tolerances).
A variant's config is resolved in this order, later layers winning:

    istr defaults <- scale preset <- entry scale overrides <- variant overrides
                  <- variant overrides of this scale <- command-line key=value

Paper numbers live only in the YAML files. Reported-only rows (``runner: null``) are never run.
Importing this module does not import torch or pandas (``--dry-run`` must stay fast).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from istr.config import Config, ConfigError, apply_overrides, build_config

TABLES_DIR = Path(__file__).with_name("tables")
NAMES = ("table1a", "table1b", "table1c", "table1d", "table1e", "table2", "fig1", "fig3", "latency")
SCALES = ("tiny", "smoke", "paper")
METRICS = (
    "mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl",
    "box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm", "box_APl",
    "fps", "time_ms", "explained_variance",
)
# Where a job's metrics.json holds an entry's numbers:
#   final  -> metrics["final"][metric]            (istr / maskrcnn training jobs; rows = variants)
#   top    -> metrics[metric]                     (latency; rows = variants)
#   stages -> metrics["stages"][k][metric]        (rows = "stage k")
#   pca    -> cumsum(metrics["explained_variance_ratio"])[l - 1]   (rows = "l=<l>")
KINDS = ("final", "top", "stages", "pca")


@dataclass(frozen=True)
class Variant:
    label: str
    runner: Optional[str]  # None: a reported-only row (another paper's number), never run
    overrides: dict[str, Any]
    options: dict[str, Any]
    reference: dict[str, float]  # metric -> paper value, NaN where the paper gives none
    meta: dict[str, Any]

    @property
    def reported_only(self) -> bool:
        return self.runner is None


@dataclass(frozen=True)
class ScaleSettings:
    preset: str  # the istr.config preset the configs start from
    overrides: dict[str, Any]
    variant_overrides: dict[str, dict[str, Any]]
    options: dict[str, Any]
    seeds: int  # seeds per variant
    default_seeds: int  # seeds of the default variant: the measured seed spread
    resources: dict[str, Any]
    tolerance: dict[str, dict[str, float]]  # metric group -> {abs, rel, std_factor}
    deviations: tuple[str, ...]  # entry-level deviations from the paper at this scale (prose)


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    source: dict[str, Any]
    kind: str
    columns: tuple[str, ...]
    measured_columns: tuple[str, ...]  # columns our jobs produce (Table 2's fps comes from `latency`)
    rows: tuple[str, ...]
    variants: tuple[Variant, ...]
    default: str
    rank_metric: Optional[str]
    notes: str
    options: dict[str, Any]
    scales: dict[str, dict[str, Any]]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(v.label for v in self.variants)

    def variant(self, label: str) -> Variant:
        for v in self.variants:
            if v.label == label:
                return v
        raise ConfigError(f"{self.name}: unknown variant '{label}'; choose one of {', '.join(map(repr, self.labels))}")

    @property
    def reference(self):
        """DataFrame: index = row labels, columns = metrics in the paper's order, NaN where not given."""
        import pandas as pd

        data = [[self._reference_value(row, col) for col in self.columns] for row in self.rows]
        frame = pd.DataFrame(data, index=pd.Index(self.rows, name="variant"), columns=list(self.columns), dtype=float)
        return frame

    def _reference_value(self, row: str, column: str) -> float:
        if self.kind in ("final", "top"):
            return self.variant(row).reference.get(column, math.nan)
        return math.nan  # figures: the paper prints no numbers

    def settings(self, scale: str) -> ScaleSettings:
        if scale not in SCALES:
            raise ConfigError(f"unknown scale '{scale}'; choose one of {', '.join(SCALES)}")
        base = _defaults()[scale]
        own = self.scales.get(scale, {})
        tolerance = {group: dict(values) for group, values in base["tolerance"].items()}
        for group, values in own.get("tolerance", {}).items():
            tolerance.setdefault(group, {}).update(values)
        return ScaleSettings(
            preset=own.get("preset", scale),
            overrides=dict(own.get("overrides", {})),
            variant_overrides={k: dict(v) for k, v in own.get("variant_overrides", {}).items()},
            options={**self.options, **own.get("options", {})},
            seeds=int(own.get("seeds", base["seeds"])),
            default_seeds=int(own.get("default_seeds", base["default_seeds"])),
            resources={**base["resources"], **own.get("resources", {})},
            tolerance=tolerance,
            deviations=tuple(own.get("deviations", ())),
        )

    def num_seeds(self, label: str, scale: str, seeds: Optional[int] = None) -> int:
        """``seeds`` if given, else the scale's count (the default variant gets ``default_seeds``)."""
        if seeds:
            return seeds
        settings = self.settings(scale)
        return max(settings.seeds, settings.default_seeds) if label == self.default else settings.seeds

    def runnable(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if not v.reported_only)

    def resolve(self, label: str, scale: str, overrides: Sequence[str] = (), seed_index: int = 0) -> Config:
        """The config of one job: ``label`` at ``scale`` with command-line ``overrides``, seed offset ``seed_index``."""
        settings = self.settings(scale)
        variant = self.variant(label)
        cfg = build_config(settings.preset)
        for layer in (settings.overrides, variant.overrides, settings.variant_overrides.get(label, {}), list(overrides)):
            cfg = apply_overrides(cfg, layer)
        cfg.seed += seed_index
        return cfg

    def job_options(self, label: str, scale: str) -> dict[str, Any]:
        """Runner options (e.g. latency's sizes / warm-up / runs): entry <- scale <- variant."""
        return {**self.settings(scale).options, **self.variant(label).options}

    def row_labels(self, cfg: Config) -> tuple[str, ...]:
        """Rows a job of this entry fills (stages beyond ``num_stages`` stay empty)."""
        if self.kind == "stages":
            return tuple(r for r in self.rows if int(r.split()[-1]) <= cfg.model.head.num_stages)
        return self.rows

    def required_keys(self, cfg: Config, label: str) -> list[tuple[str, ...]]:
        """Key paths a complete metrics.json must hold for this entry (what the entry asks for)."""
        if self.kind == "final":
            return [("final", c) for c in self.measured_columns]
        if self.kind == "top":
            return [(c,) for c in self.measured_columns]
        if self.kind == "stages":
            return [("stages", r.split()[-1], c) for r in self.row_labels(cfg) for c in self.measured_columns]
        return [("explained_variance_ratio",)]


def names() -> tuple[str, ...]:
    return NAMES


@functools.lru_cache(maxsize=None)
def get(name: str) -> Entry:
    if name not in NAMES:
        raise ConfigError(f"unknown experiment '{name}'; choose one of {', '.join(NAMES)}")
    return _load(TABLES_DIR / f"{name}.yaml")


@functools.lru_cache(maxsize=None)
def _defaults() -> dict[str, Any]:
    return yaml.safe_load((TABLES_DIR / "_defaults.yaml").read_text())["scales"]


def _load(path: Path) -> Entry:
    data = yaml.safe_load(path.read_text())
    where = path.name
    columns = tuple(data["columns"])
    bad = [c for c in columns if c not in METRICS]
    if bad or data["kind"] not in KINDS:
        raise ConfigError(f"{where}: unknown metric(s) {bad} or kind '{data['kind']}' (metrics: {METRICS}, kinds: {KINDS})")
    variants = []
    for item in data["variants"]:
        values = item.get("reference") or [None] * len(columns)
        if len(values) != len(columns):
            raise ConfigError(f"{where}: variant '{item['label']}' has {len(values)} reference values for {len(columns)} columns")
        variants.append(
            Variant(
                label=item["label"],
                runner=item.get("runner", data["runner"]),
                overrides=dict(item.get("overrides") or {}),
                options=dict(item.get("options") or {}),
                reference={c: (math.nan if v is None else float(v)) for c, v in zip(columns, values)},
                meta=dict(item.get("meta") or {}),
            )
        )
    labels = [v.label for v in variants]
    if data["default"] not in labels or len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: default '{data['default']}' must be one of the (unique) labels {labels}")
    return Entry(
        name=data["name"],
        title=data["title"],
        source=dict(data["source"]),
        kind=data["kind"],
        columns=columns,
        measured_columns=tuple(data.get("measured_columns", columns)),
        rows=tuple(data.get("rows", labels)),
        variants=tuple(variants),
        default=data["default"],
        rank_metric=data.get("rank_metric"),
        notes=" ".join(str(data.get("notes", "")).split()),
        options=dict(data.get("options") or {}),
        scales=dict(data.get("scales") or {}),
    )
