"""AP against training iterations and seconds, per stage, from a run's ``learning_curve.jsonl``.

    python -m experiments.learning_curve RUN_DIR [--out reports/NAME]

A run writes that file when trained with ``solver.eval_period=N`` (and ``solver.eval_images``, the first val
images each point is measured on). Writes ``NAME.md`` (the solver settings, a table and the figure) and
``figures/NAME.{png,svg}`` next to it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from experiments import plots, store

METRICS = ("mask_AP", "box_AP")


def load(run_dir: str | Path) -> pd.DataFrame:
    """Long frame: one row per (point, stage) with iteration, train_time_s, stage and the AP metrics."""
    path = Path(run_dir) / "learning_curve.jsonl"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: no such result directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no learning curve (train with solver.eval_period=N to record one)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            point = json.loads(line)
            for stage, values in point["stages"].items():
                rows.append({"iteration": point["iteration"], "train_time_s": point["train_time_s"],
                             "stage": int(stage), **{m: values.get(m) for m in METRICS}})
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}:{number}: not a learning-curve point ({err})") from None
    if not rows:
        raise ValueError(f"{path}: empty learning curve")
    return pd.DataFrame(rows).sort_values(["iteration", "stage"]).reset_index(drop=True)


def figure(curve: pd.DataFrame, title: str, stem: str | Path) -> list[Path]:
    """Mask AP (solid) and box AP (dashed) against iteration, one colour per stage."""
    fig, ax = plots.plt.subplots(figsize=(6, 4))
    colours = plots.plt.cm.viridis([i / max(1, curve.stage.max() - 1) for i in range(curve.stage.max())])
    for stage, part in curve.groupby("stage"):
        for metric, style in zip(METRICS, ("-", "--")):
            ax.plot(part.iteration, part[metric], style, color=colours[stage - 1], marker=".",
                    label=f"{metric} stage {stage}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    return plots.save(fig, stem)


def render(curve: pd.DataFrame, run_dir: Path, figure_path: str, cfg: dict) -> str:
    last_stage = curve.stage.max()
    wide = curve.pivot(index=["iteration", "train_time_s"], columns="stage", values=list(METRICS))
    solver = cfg.get("solver", {})
    lines = [f"# Learning curve of {run_dir.name}", "",
             (f"COCO AP (0-100) on the first {solver.get('eval_images', '?')} val images, measured every "
             f"{solver.get('eval_period', '?')} iterations of {solver.get('max_iter', '?')} "
             f"(lr {solver.get('lr', '?')}, steps {solver.get('steps', '?')}, batch {solver.get('batch_size', '?')}). "
             f"Stage {last_stage} is the model's answer. Seconds are training time only (no evaluation)."), "",
             "| iteration | train s | " + " | ".join(f"{m} s{s}" for m in METRICS for s in range(1, last_stage + 1)) + " |",
             "|" + "---|" * (2 + len(METRICS) * last_stage)]
    for (iteration, seconds), row in wide.iterrows():
        cells = [f"{row[(m, s)]:.1f}" for m in METRICS for s in range(1, last_stage + 1)]
        lines.append(f"| {iteration} | {seconds:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"![learning curve]({figure_path})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.learning_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding learning_curve.jsonl")
    parser.add_argument("--out", type=Path, help="report path without suffix (default reports/learning_curve_<run>)")
    args = parser.parse_args(argv)
    try:
        curve = load(args.run_dir)
        cfg = yaml.safe_load((args.run_dir / "config.yaml").read_text()) if (args.run_dir / "config.yaml").is_file() else {}
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("reports") / f"learning_curve_{args.run_dir.name}"
    figures = figure(curve, f"learning curve: {args.run_dir.name}", out.parent / "figures" / out.name)
    png = next(p for p in figures if p.suffix == ".png").relative_to(out.parent).as_posix()
    store.write_text_atomic(out.with_suffix(".md"), render(curve, args.run_dir, png, cfg or {}))
    print(out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
