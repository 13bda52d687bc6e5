"""Markdown report of one entry: ours | paper | delta, seed spread, ranking agreement, figures, provenance.

Written to ``<reports_dir>/<name>.md`` at smoke scale and ``<reports_dir>/<name>-<scale>.md`` otherwise,
figures to ``<reports_dir>/figures/<same stem>.{png,svg}``.

Ranking (entries with a ``rank_metric``), over rows that have both our mean and a paper value:
- Kendall tau (``scipy.stats.kendalltau``) between our values and the paper's.
- Every pair (a, b) the paper orders (paper(a) > paper(b)) is marked by d = ours(a) - ours(b):
  "within noise" when |d| < 2 * sigma, else "reproduced" when d > 0, "reversed" when d < 0.
  sigma is the pooled seed standard deviation of that metric over the entry's rows with >= 2 seeds,
  sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)). Without any row of >= 2 seeds there is no noise band, so no
  pair is claimed: a nonzero d is only "same order, noise unknown" or "opposite order, noise unknown".
  Paper ties are listed as such.
"""
from __future__ import annotations

import datetime
import itertools
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from istr.config import preset_deviations

from experiments import aggregate, jobs, plots, store
from experiments.run import report_path_stem

NOISE_FACTOR = 2.0


def pooled_std(agg: aggregate.Aggregate, metric: str) -> float:
    """Pooled seed std of ``metric`` over rows with >= 2 seeds; NaN if there are none."""
    counts, stds = agg.count[metric], agg.std[metric]
    usable = [(n, s) for n, s in zip(counts, stds) if n >= 2 and not math.isnan(s)]
    dof = sum(n - 1 for n, _ in usable)
    return math.sqrt(sum((n - 1) * s * s for n, s in usable) / dof) if dof else math.nan


def ordering(agg: aggregate.Aggregate, metric: str) -> dict[str, Any]:
    """Kendall tau and the verdict on every pairwise ordering of the paper (see the module docstring)."""
    from scipy.stats import kendalltau

    paper, ours = agg.entry.reference[metric], agg.mean[metric]
    rows = [r for r in paper.index if not math.isnan(paper[r]) and not math.isnan(ours[r])]
    sigma = pooled_std(agg, metric)
    threshold = NOISE_FACTOR * sigma if not math.isnan(sigma) else 0.0
    pairs = []
    for a, b in itertools.combinations(sorted(rows, key=lambda r: -paper[r]), 2):
        paper_delta, ours_delta = paper[a] - paper[b], ours[a] - ours[b]
        if paper_delta == 0:
            verdict = "paper tie"
        elif abs(ours_delta) < threshold or ours_delta == 0:
            verdict = "within noise"
        elif math.isnan(sigma):  # one seed per row: an order without a noise band is no claim
            verdict = "same order, noise unknown" if ours_delta > 0 else "opposite order, noise unknown"
        else:
            verdict = "reproduced" if ours_delta > 0 else "reversed"
        pairs.append({"a": a, "b": b, "paper_delta": paper_delta, "ours_delta": ours_delta, "verdict": verdict})
    tau = kendalltau([paper[r] for r in rows], [ours[r] for r in rows]) if len(rows) >= 2 else None
    return {"metric": metric, "rows": rows, "sigma": sigma, "threshold": threshold, "pairs": pairs,
            "tau": float(tau.statistic) if tau is not None else math.nan,
            "p_value": float(tau.pvalue) if tau is not None else math.nan}


def write_report(name: str, scale: str, results_root: str | Path, reports_dir: str | Path = "reports",
                 seeds: Optional[int] = None, overrides: Sequence[str] = ()) -> Path:
    agg = aggregate.collect(name, scale, results_root, seeds=seeds, overrides=overrides)
    reports_dir = Path(reports_dir)
    stem = report_path_stem(name, scale)
    figures = make_figures(agg, reports_dir / "figures" / stem)
    text = render(agg, [p.relative_to(reports_dir).as_posix() for p in figures if p.suffix == ".png"], overrides)
    path = reports_dir / f"{stem}.md"
    store.write_text_atomic(path, text)
    return path


def make_figures(agg: aggregate.Aggregate, stem: Path) -> list[Path]:
    entry = agg.entry
    if entry.kind == "pca":
        curves = agg.extras.get("explained_variance_ratio") or []
        marks = [int(r.split("=")[-1]) for r in entry.rows]
        return plots.variance_curve(curves, marks, entry.title, stem) if curves else []
    if entry.kind == "stages":
        return plots.stage_curve(agg.mean, agg.std, entry.title, stem) if agg.runs else []
    metrics = [m for m in (entry.rank_metric, "box_AP", "time_ms") if m in entry.measured_columns]
    reported = [v.label for v in entry.variants if v.reported_only]
    return plots.bars(agg.mean, agg.std, entry.reference, list(dict.fromkeys(metrics)), reported, entry.title, stem)


def render(agg: aggregate.Aggregate, figures: Sequence[str] = (), overrides: Sequence[str] = ()) -> str:
    entry = agg.entry
    lines = [f"# {entry.title} ({agg.scale} scale)", ""]
    source = ", ".join(f"{k}: {v}" for k, v in entry.source.items())
    lines += [f"Paper source: {source}. Ours: mean over seeds (± sample std when there are 2 or more seeds).", ""]
    if agg.scale != "paper":
        lines += [f"At {agg.scale} scale ours runs on other data with the deviations listed below: levels are not "
                  "comparable with the paper's; the orderings are the comparison that matters.", ""]
    if entry.notes:
        lines += [entry.notes, ""]
    lines += ["## Ours | paper | delta", "", *_results_table(agg), ""]
    if agg.missing:
        lines += [f"Missing results (planned, not complete): {', '.join(agg.missing)}.", ""]
    lines += ["## Seed spread", "", *_spread_table(agg), ""]
    if entry.rank_metric:
        lines += ["## Ranking agreement", "", *_ranking(agg), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{entry.name}]({f})" for f in figures] + [""]
    lines += ["## Provenance", "", *_provenance(agg, overrides), ""]
    return "\n".join(lines)


def _fmt(metric: str, value: float, digits: int | None = None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.{digits if digits is not None else (3 if metric == 'explained_variance' else 1)}f}"


def _results_table(agg: aggregate.Aggregate) -> list[str]:
    entry, paper = agg.entry, agg.entry.reference
    reported = {v.label for v in entry.variants if v.reported_only}
    head = ["variant", ""] + list(entry.columns)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in entry.rows:
        ours_cells, delta_cells = [], []
        for col in entry.columns:
            mean, std, n = agg.mean.loc[row, col], agg.std.loc[row, col], agg.count.loc[row, col]
            if row in reported:
                ours_cells.append("reported")
            elif col not in entry.measured_columns:
                ours_cells.append("n/a")
            elif math.isnan(mean):
                ours_cells.append("missing")
            else:
                ours_cells.append(_fmt(col, mean) + (f" ± {_fmt(col, std, 2 if col != 'explained_variance' else 4)}" if n >= 2 else ""))
            delta_cells.append("" if math.isnan(mean) or math.isnan(paper.loc[row, col]) else f"{mean - paper.loc[row, col]:+.1f}")
        label = f"{row} (reported)" if row in reported else row
        out.append(f"| {label} | ours | " + " | ".join(ours_cells) + " |")
        out.append("| | paper | " + " | ".join(_fmt(c, paper.loc[row, c]) for c in entry.columns) + " |")
        if any(delta_cells):
            out.append("| | Δ | " + " | ".join(delta_cells) + " |")
    return out


def _spread_table(agg: aggregate.Aggregate) -> list[str]:
    entry = agg.entry
    head = ["variant", "seeds"] + [f"{c} min–max" for c in entry.measured_columns]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in entry.rows:
        counts = agg.count.loc[row, list(entry.measured_columns)]
        if counts.max() == 0:
            continue
        cells = [f"{_fmt(c, agg.min.loc[row, c])}–{_fmt(c, agg.max.loc[row, c])}" for c in entry.measured_columns]
        out.append(f"| {row} | {int(counts.max())} | " + " | ".join(cells) + " |")
    return out if len(out) > 2 else ["No results yet."]


def _ranking(agg: aggregate.Aggregate) -> list[str]:
    result = ordering(agg, agg.entry.rank_metric)
    metric = result["metric"]
    if len(result["rows"]) < 2:
        return [f"Fewer than two rows with both our and the paper's {metric}: no ranking."]
    if math.isnan(result["sigma"]):
        band = ("no row has 2 or more seeds, so there is no noise band and no ordering is claimed as reproduced "
                "or reversed (run with --seeds 2 or more)")
    else:
        band = f"within noise = |d| < {NOISE_FACTOR:g} × pooled seed std ({result['sigma']:.2f}) = {result['threshold']:.2f}"
    counts = pd.Series([p["verdict"] for p in result["pairs"]]).value_counts().to_dict()
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    out = [f"Metric {metric}; Kendall tau (ours vs paper, {len(result['rows'])} rows) = {result['tau']:.2f} "
           f"(p = {result['p_value']:.2f}); {band}. Pairs: {summary}.", "",
           "| paper order | paper Δ | ours Δ | verdict |", "|---|---|---|---|"]
    for p in result["pairs"]:
        out.append(f"| {p['a']} > {p['b']} | {p['paper_delta']:+.1f} | {p['ours_delta']:+.2f} | {p['verdict']} |")
    return out


def _provenance(agg: aggregate.Aggregate, overrides: Sequence[str]) -> list[str]:
    settings = agg.entry.settings(agg.scale)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    runs = agg.runs
    hardware = sorted({f"{r.get('cpu')} ({r.get('cpu_count')} cores{', no native bf16' if r.get('cpu_native_bf16') is False else ''})"
                       f" on {r.get('host')}" for r in runs})
    versions = sorted({f"torch {r.get('torch')}, torchvision {r.get('torchvision')}" for r in runs})
    commits = sorted({c for r in runs for c in r.get("commits") or [str(r.get("git_commit"))]})
    seeds = {}
    for r in runs:
        seeds[r["label"]] = seeds.get(r["label"], 0) + 1
    out = [f"- report written {now} at harness commit {jobs.git_commit()}",
           f"- scale: {agg.scale} (istr preset '{settings.preset}'); seeds per variant: "
           + (", ".join(f"{k}: {v}" for k, v in seeds.items()) or "none"),
           f"- hardware: {'; '.join(hardware) or 'no runs'}",
           f"- versions: {'; '.join(versions) or 'no runs'}; runs (every attempt) at commit(s) {', '.join(commits) or '-'}"]
    deviations = preset_deviations(settings.preset)
    out.append("- deviations from the paper's setup:" if deviations or settings.overrides or settings.deviations
               or settings.variant_overrides or overrides else "- deviations from the paper's setup: none")
    out += [f"  - {k}: paper {a!r} -> {b!r}" for k, (a, b) in deviations.items()]
    out += [f"  - {k} = {v!r} (entry setting at this scale)" for k, v in settings.overrides.items()]
    out += [f"  - {label}: {k} = {v!r}" for label, o in settings.variant_overrides.items() for k, v in o.items()]
    out += [f"  - {text}" for text in settings.deviations]
    out += [f"  - command line: {o}" for o in overrides]
    out += ["", "Wall time of the last attempt, and summed over the attempts run.json recorded (a stopped job resumed, "
            "a stale one evaluated again; attempts before 2026-11-26 were not recorded; ≥ marks a sum missing an attempt "
            "that was killed before it could write its wall time); training time is summed over every attempt.",
            "", "| variant | seed | hash | wall time, last (s) | wall time, all (s) | attempts | training time (s) | host "
            "| finished |", "|---|---|---|---|---|---|---|---|---|"]

    def seconds(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, (int, float)) else "—"

    def total(r: dict) -> str:
        return ("≥ " if r.get("wall_s_unrecorded") else "") + seconds(r.get("wall_s_total"))

    for r in runs:
        finished = (r.get("end") or "—") + (f" (adopted from {r['adopted_from']})" if r.get("adopted_from") else "")
        out.append(f"| {r['label']} | {r['seed']} | {r['hash']} | {seconds(r.get('wall_s'))} "
                   f"| {total(r)} | {r.get('attempts', 1)} | {seconds(r.get('train_s'))} "
                   f"| {r.get('host') or '—'} | {finished} |")
    return out
