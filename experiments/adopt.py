"""Adopt a training run made outside the harness (``python -m istr.train``) as the result of one registry job.

    python -m experiments.adopt RUN_DIR NAME LABEL [--scale smoke] [--seed-index K] [--commit SHA] [key=value ...]

The run counts only if it is exactly that job: its config.yaml must equal the job's config as the engine
resolves it (the dataset's class count, the cached pretrained-backbone path), and its metrics.json must
hold every metric the entry needs. The run is then copied into ``results/<hash>/`` (written beside it and
renamed, so a half-copied directory is never seen) with the job's spec.json and a run.json that says where
it came from. host, cpu and versions in run.json are those of the machine that adopts: adopt on the machine
that trained. Wall time = the run's own training + evaluation time from metrics.json.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from istr.config import ConfigError, from_dict, to_dict
from istr.data import DatasetError
from istr.engine.job import diff_keys, prepare

from experiments import jobs, registry, store

ADOPTABLE_RUNNERS = ("istr", "maskrcnn")  # runners whose job is one istr.engine training run


def resolved_config(cfg) -> dict:
    """The job's config as the engine writes it to config.yaml (class count and backbone weights resolved)."""
    resolved, *_ = prepare(cfg, logging.getLogger("istr.adopt"), build=lambda *args: None)
    return to_dict(resolved)


def adopt(run_dir: str | Path, name: str, label: str, scale: str = "smoke", seed_index: int = 0,
          overrides: Sequence[str] = (), root: str | Path | None = None, commit: str = "unknown") -> Path:
    """Copy ``run_dir`` into the job's result directory; returns it. Raises ConfigError on any mismatch."""
    run_dir = Path(run_dir)
    entry = registry.get(name)
    cfg, spec, digest = jobs.for_variant(entry, label, scale, overrides, seed_index)
    if spec["runner"] not in ADOPTABLE_RUNNERS:
        raise ConfigError(f"{name}/{label}: runner '{spec['runner']}' jobs cannot be adopted (only {', '.join(ADOPTABLE_RUNNERS)})")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: not found (RUN_DIR must be an istr.train output directory)")
    run_config = to_dict(from_dict(yaml.safe_load(config_file.read_text())))  # keys added since: their old meaning
    differing = diff_keys(run_config, resolved_config(cfg))
    if differing:
        raise ConfigError(f"{run_dir} is not the job {name}/{label} seed {seed_index} at {scale} scale: config differs in "
                          f"{', '.join(differing[:6])}{' ...' if len(differing) > 6 else ''}")
    metrics = store.read_metrics(run_dir)
    missing = store.missing_keys(metrics, entry.required_keys(cfg, label)) if metrics else ["metrics.json"]
    if missing:
        raise ConfigError(f"{run_dir}: incomplete run, missing {', '.join(missing[:6])}")
    root = store.results_root(str(root) if root else None)
    target = store.result_dir(root, digest)
    if target.exists():
        raise ConfigError(f"{target} already exists; remove it first to replace it with {run_dir}")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".adopt-{digest}-", dir=root))
    try:
        copy = staging / digest
        shutil.copytree(run_dir, copy)
        store.write_json_atomic(copy / "spec.json", spec)
        finished = datetime.datetime.fromtimestamp((run_dir / "metrics.json").stat().st_mtime, datetime.timezone.utc)
        store.write_json_atomic(copy / "run.json", {
            **jobs.provenance(), "hash": digest, "status": "done", "git_commit": commit,
            "adopted_from": str(run_dir.resolve()), "end": finished.isoformat(timespec="seconds"),
            "wall_s": float(metrics.get("train_time_s", 0.0)) + float(metrics.get("eval_time_s", 0.0))})
        copy.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.adopt", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an istr.train --output-dir holding config.yaml and metrics.json")
    parser.add_argument("name", help="the experiment (see python -m experiments.run --list)")
    parser.add_argument("label", help="the variant label, e.g. l=60")
    parser.add_argument("overrides", nargs="*", help="the overrides the job uses (as given to experiments.run)")
    parser.add_argument("--scale", default="smoke", help="the job's scale (default smoke)")
    parser.add_argument("--seed-index", type=int, default=0, help="which seed of the variant the run is (0 = the first)")
    parser.add_argument("--results-root", default=None, help="as for experiments.run (default $ISTR_RESULTS, else results/)")
    parser.add_argument("--commit", default="unknown", help="the harness commit the run was trained at, for the record")
    args = parser.parse_intermixed_args(argv)
    try:
        target = adopt(args.run_dir, args.name, args.label, args.scale, args.seed_index, args.overrides,
                       args.results_root, args.commit)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"adopted {args.run_dir} as {args.name}/{args.label} seed {args.seed_index}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
