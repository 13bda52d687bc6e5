"""Report figures (matplotlib Agg), each written as PNG and SVG atomically.

    bars(...)           ablations / Table 2 / latency: ours (mean, std error bar from 2+ seeds) next to the paper,
                        reported-only rows hatched and labelled "reported"
    variance_curve(...) Figure 1: cumulative explained variance vs number of components, 40/60/80 marked
    stage_curve(...)    Figure 3: mask and box AP per refinement stage
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FORMATS = ("png", "svg")


def save(fig, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """``stem.png`` and ``stem.svg`` (or ``formats``), each through a temporary file and ``os.replace``.

    Same figure, same bytes: the SVG gets a fixed id salt and no date, so a re-render changes committed figures
    only when their content changes."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        tmp = path.with_name(f".{path.name}.tmp")
        with plt.rc_context({"svg.hashsalt": "istr-report"}):
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


def bars(ours: pd.DataFrame, std: pd.DataFrame, paper: pd.DataFrame, metrics: Sequence[str],
         reported: Sequence[str], title: str, stem: str | Path) -> list[Path]:
    """One panel per metric; per row a bar for ours (mean +- std) and one for the paper."""
    rows = list(paper.index)
    stacked = len(rows) > 8  # long tables (Table 2): one panel per line
    width = max(4.0, 0.6 * len(rows))
    shape, size = ((len(metrics), 1), (width, 3.6 * len(metrics))) if stacked else ((1, len(metrics)), (width * len(metrics), 3.6))
    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False, layout="constrained")  # no label over a title
    x = np.arange(len(rows))
    for ax, metric in zip(axes.flat, metrics):
        measured = ours[metric].to_numpy(dtype=float)
        errors = std[metric].to_numpy(dtype=float)
        ax.bar(x - 0.2, measured, 0.4, label="ours (mean, std if 2+ seeds)", color="tab:blue")
        spread = np.isfinite(errors)  # one seed has no std: no error bar rather than a zero-width one
        ax.errorbar(x[spread] - 0.2, measured[spread], yerr=errors[spread], fmt="none", ecolor="black", capsize=3)
        for i, row in enumerate(rows):
            is_reported = row in reported
            ax.bar(x[i] + 0.2, paper.loc[row, metric], 0.4, color="lightgray" if is_reported else "tab:orange",
                   hatch="//" if is_reported else None, edgecolor="gray",
                   label=("paper" if not is_reported else "reported (other papers)") if _first(rows, reported, i) else None)
            if math.isnan(measured[i]):
                ax.text(x[i] - 0.2, 0, "reported" if is_reported else "missing", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, rows, rotation=35, ha="right", fontsize=8)
        ax.set_title(metric)
    # one legend under the panels: inside a panel it hides bars or error bars
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def _first(rows: Sequence[str], reported: Sequence[str], i: int) -> bool:
    """Label only the first bar of each kind so the legend lists each kind once."""
    kind = rows[i] in reported
    return all((rows[j] in reported) != kind for j in range(i))


def variance_curve(curves: Sequence[Sequence[float]], marks: Sequence[int], title: str, stem: str | Path) -> list[Path]:
    """Cumulative explained variance (mean over fits) vs number of components, first 100, ``marks`` annotated."""
    cumulative = np.mean([np.cumsum(np.asarray(c, dtype=float)) for c in curves], axis=0)
    shown = min(100, len(cumulative))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(np.arange(1, shown + 1), cumulative[:shown], color="tab:blue")
    for k in marks:
        if k <= len(cumulative):
            ax.axvline(k, color="gray", linestyle=":")
            ax.annotate(f"l={k}: {cumulative[k - 1]:.3f}", (k, cumulative[k - 1]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
    ax.set_xlabel("number of components l")
    ax.set_ylabel("cumulative explained variance")
    ax.set_title(title, fontsize=10)
    return save(fig, stem)


def stage_curve(mean: pd.DataFrame, std: pd.DataFrame, title: str, stem: str | Path) -> list[Path]:
    """AP (mean +- std over seeds) per stage; one line per metric column."""
    stages = [int(r.split()[-1]) for r in mean.index]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for metric in mean.columns:
        # one seed: std is NaN and matplotlib draws no error bar (not a zero-width one)
        ax.errorbar(stages, mean[metric].to_numpy(dtype=float), yerr=std[metric].to_numpy(dtype=float),
                    marker="o", capsize=3, label=metric)
    ax.set_xlabel("stage")
    ax.set_ylabel("AP")
    ax.set_xticks(stages)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save(fig, stem)
