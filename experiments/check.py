"""Are the results what they must be? ``python -m experiments.check NAME [--scale smoke] [key=value ...]``.

    paper scale   ours vs the paper's numbers (registry), within the entry's paper tolerance
    smoke / tiny  ours vs the committed baseline experiments/smoke_baselines/<name>.json
                  (<name>-<scale>.json at tiny), within the tolerance recorded there
    --update-baseline   write that baseline from the current results (value = mean over seeds,
                  tolerance = max(abs, rel * |value|, std_factor * pooled seed std), from the scale's settings)

One line per checked cell. Exit 0: every cell passes; 1: a cell is out of tolerance (a regression);
2: a cell is missing or incomplete, the baseline is missing or stale (written from none of the jobs the current
configuration plans: the preset, the registry or the overrides changed; ``--changed-config`` compares anyway),
or there is nothing to check (missing never passes, and takes precedence over 1). Reported-only rows and cells
without an expected value are not checked.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from istr.config import ConfigError

from experiments import aggregate, jobs, registry, store
from experiments.run import report_path_stem

BASELINES_DIR = Path(__file__).with_name("smoke_baselines")


class StaleBaseline(ValueError):
    """The smoke baseline describes other jobs than the current configuration plans."""


def metric_group(metric: str) -> str:
    return "AP" if metric.startswith(("mask_AP", "box_AP")) else metric


def tolerance(settings: registry.ScaleSettings, metric: str, expected: float, std: float) -> float:
    rule = settings.tolerance.get(metric_group(metric), {})
    candidates = [rule.get("abs", 0.0), rule.get("rel", 0.0) * abs(expected)]
    if not math.isnan(std):
        candidates.append(rule.get("std_factor", 0.0) * std)
    return max(candidates)


def baseline_path(name: str, scale: str, directory: Path = BASELINES_DIR) -> Path:
    return directory / f"{report_path_stem(name, scale)}.json"


def runnable_rows(entry: registry.Entry) -> list[str]:
    """The entry's rows that a run can fill (its reported-only rows left out), in table order."""
    reported_only = {v.label for v in entry.variants if v.reported_only}
    return [row for row in entry.rows if row not in reported_only]


def expected_values(agg: aggregate.Aggregate, baselines_dir: Path,
                    changed_config: bool = False) -> dict[tuple[str, str], tuple[float, float]]:
    """{(row, metric): (expected, tolerance)}; raises FileNotFoundError when a needed baseline is missing and
    StaleBaseline when it was written from other jobs (unless ``changed_config`` accepts that)."""
    entry, settings = agg.entry, agg.entry.settings(agg.scale)
    runnable = set(runnable_rows(entry))
    if agg.scale == "paper":
        out = {}
        for row in entry.rows:
            for metric in entry.measured_columns:
                value = entry.reference.loc[row, metric]
                if row in runnable and not math.isnan(value):
                    out[(row, metric)] = (value, tolerance(settings, metric, value, agg.std.loc[row, metric]))
        return out
    path = baseline_path(entry.name, agg.scale, baselines_dir)
    baseline = json.loads(path.read_text())
    written_from = set(baseline.get("runs", []))
    if written_from and agg.planned and not written_from & set(agg.planned) and not changed_config:
        raise StaleBaseline(f"{path} was written from runs {', '.join(sorted(written_from))}, none of which is a job of "
                            "the current configuration (the preset, the registry or the overrides changed since): a "
                            "comparison would measure the change, not a regression")
    cells = baseline["cells"]
    return {(row, metric): (cells[row][metric]["value"], cells[row][metric]["tolerance"])
            for row in entry.rows for metric in entry.measured_columns if metric in cells.get(row, {})}


def check(agg: aggregate.Aggregate, baselines_dir: Path = BASELINES_DIR, out=None, changed_config: bool = False,
          results_root: Path | None = None) -> int:
    out = out or sys.stdout
    try:
        expected = expected_values(agg, baselines_dir, changed_config)
    except StaleBaseline as err:
        print(f"STALE baseline: {err}. Run the experiment, then --update-baseline (or compare anyway with "
              "--changed-config).", file=out)
        return 2
    except (OSError, ValueError, KeyError) as err:
        print(f"MISSING baseline {baseline_path(agg.entry.name, agg.scale, baselines_dir)} ({type(err).__name__}); "
              f"create it with --update-baseline after a complete run", file=out)
        return 2
    if not expected:
        print(f"MISSING nothing to check for {agg.entry.name} at {agg.scale} scale (no expected values)", file=out)
        return 2
    failed = missing = unlisted = 0
    if agg.scale != "paper":  # a baseline that lacks a runnable row must not let that row pass unchecked
        for row in [r for r in runnable_rows(agg.entry) if not any(key[0] == r for key in expected)]:
            unlisted += 1
            print(f"MISSING {agg.entry.name} | {row}: not in the baseline "
                  f"{baseline_path(agg.entry.name, agg.scale, baselines_dir)} (run it, then --update-baseline)", file=out)
    for (row, metric), (value, tol) in expected.items():
        ours = agg.mean.loc[row, metric] if row in agg.mean.index and metric in agg.mean.columns else math.nan
        if math.isnan(ours):
            missing += 1
            print(f"MISSING {agg.entry.name} | {row} | {metric}: no complete result (expected {value:.3f} ± {tol:.3f})", file=out)
            continue
        ok = abs(ours - value) <= tol
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {agg.entry.name} | {row} | {metric}: ours {ours:.3f}, expected {value:.3f} ± {tol:.3f} "
              f"(delta {ours - value:+.3f})", file=out)
    print(f"{len(expected)} cells: {len(expected) - failed - missing} pass, {failed} fail, {missing} missing"
          + (f"; {unlisted} row(s) not in the baseline" if unlisted else ""), file=out)
    if agg.scale == "paper":  # what makes the paper's numbers an imperfect target, e.g. another split
        for text in agg.entry.settings(agg.scale).deviations:
            print(f"NOTE {text}", file=out)
    if changed_config and agg.scale != "paper":
        print("NOTE --changed-config: the baseline was written from other jobs, so a FAIL measures the configuration "
              "change as well as any regression", file=out)
    if missing == len(expected) and results_root is not None:
        print(f"NOTE none of {agg.entry.name}'s jobs is complete under {results_root}; the project's own measured jobs "
              "are under reports/results (--results-root reports/results)", file=out)
    return 2 if missing or unlisted else (1 if failed else 0)


def update_baseline(agg: aggregate.Aggregate, baselines_dir: Path = BASELINES_DIR) -> Path:
    from experiments.report import pooled_std

    entry, settings = agg.entry, agg.entry.settings(agg.scale)
    cells: dict[str, dict[str, Any]] = {}
    for row in entry.rows:
        for metric in entry.measured_columns:
            value = agg.mean.loc[row, metric]
            if math.isnan(value):
                continue
            sigma = pooled_std(agg, metric)
            cells.setdefault(row, {})[metric] = {
                "value": float(value), "tolerance": tolerance(settings, metric, value, sigma),
                "std": None if math.isnan(agg.std.loc[row, metric]) else float(agg.std.loc[row, metric]),
                "pooled_std": None if math.isnan(sigma) else sigma, "seeds": int(agg.count.loc[row, metric])}
    if not cells:
        raise ConfigError(f"{entry.name}: no complete results at {agg.scale} scale; nothing to write")
    data = {"name": entry.name, "scale": agg.scale, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "harness_commit": jobs.git_commit(), "runs": [r["hash"] for r in agg.runs], "cells": cells}
    path = baseline_path(entry.name, agg.scale, baselines_dir)
    store.write_json_atomic(path, data)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.check", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="an experiment (see python -m experiments.run --list)")
    parser.add_argument("overrides", nargs="*", help="the config overrides the run used (key=value)")
    parser.add_argument("--scale", default="smoke",
                        help="paper: compare with the paper's values; smoke/tiny: with the committed smoke baseline")
    parser.add_argument("--seeds", type=int, default=None, help="the --seeds the run used")
    parser.add_argument("--results-root", default=None, help="as for experiments.run (default $ISTR_RESULTS, else results/)")
    parser.add_argument("--baselines-dir", default=str(BASELINES_DIR), help="where <name>.json smoke baselines live")
    parser.add_argument("--update-baseline", action="store_true",
                        help="write the smoke baseline from the current results instead of checking")
    parser.add_argument("--changed-config", action="store_true",
                        help="compare with a baseline written from other jobs (e.g. fp32 runs, solver.amp=none, against "
                             "the committed bf16 baseline): a difference then includes the configuration change")
    args = parser.parse_intermixed_args(argv)
    try:
        registry.get(args.name).settings(args.scale)  # validates name and scale
        root = store.results_root(args.results_root)
        agg = aggregate.collect(args.name, args.scale, root, args.seeds, args.overrides)
        if args.update_baseline:
            if args.scale == "paper":
                raise ConfigError("--update-baseline: the paper scale is checked against the paper, not a baseline")
            print(f"wrote {update_baseline(agg, Path(args.baselines_dir))}")
            return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return check(agg, Path(args.baselines_dir), changed_config=args.changed_config, results_root=root)


if __name__ == "__main__":
    sys.exit(main())
