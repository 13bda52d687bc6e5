"""Run the experiments of the paper: ``python -m experiments.run NAME|all [options] [key=value ...]``.

    --scale tiny|smoke|paper   istr.config preset + the entry's scale settings (default smoke)
    --executor debug|local|slurm   in-process loop | submitit local subprocesses | one SLURM array per
                               table (default local; --slurm KEY=VALUE, --sbatch, --slurm-config,
                               --slurm-folder: see experiments/slurm_executor.py, slurm/README.md)
    --status                   show each job's state (its SLURM job and log, once submitted) and stop
    --dry-run                  print the plan (jobs, hashes, cached or not, resources) and stop
    --estimate                 also time a few iterations of each job to run on this machine and print how long
                               the plan would take here (then stop; ~15-30 s per distinct job at smoke)
    --list                     list the entries and their variants
    --seeds N                  N seeds per variant (seed i sets cfg.seed += i); default: the scale's
                               (smoke: 1 per variant, 3 for each entry's default variant)
    --results-root DIR         default $ISTR_RESULTS or results/
    --reports-dir DIR          default reports/
    --only LABEL ...           run only these variants
    key=value                  config overrides applied to every job, after the registry's

A job whose config is already complete in the results root is not run again: the default model, shared by
the five parts of Table 1 and Figure 3, runs once per seed. A trained job whose metrics come from an older
evaluation protocol (istr.config.EVAL_PROTOCOL) is "stale": it is evaluated again, not retrained. After the runs every selected entry is
aggregated and reported (reports/<name>.md at smoke scale, reports/<name>-<scale>.md otherwise).
Exit status: 0 all jobs complete, 1 a job failed, 2 bad input (nothing written), 130 / 143 stopped by Ctrl-C /
SIGTERM (the running job saves its last completed iteration and its attempt is recorded as stopped; the same
command resumes it from there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from istr.config import ConfigError, from_dict, starts_from_random_weights

from experiments import jobs, registry, slurm_executor, store


@dataclass
class PlannedJob:
    digest: str
    directory: Path
    spec: dict[str, Any]
    uses: list[str]  # "table1a/l=60/seed0", ... every entry row this job serves
    required: list[tuple[str, ...]]
    resources: dict[str, Any]
    state: str  # "cached" | "stale" (trained, evaluated under an older protocol) | "partial" (incomplete) | "new"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def plan(names: Sequence[str], scale: str, results_root: str | Path, seeds: int | None = None,
         only: Sequence[str] = (), overrides: Sequence[str] = ()) -> list[PlannedJob]:
    """Every job the selected entries need, deduplicated by hash. Raises ConfigError on bad input."""
    entries = [registry.get(n) for n in names]
    valid = sorted({label for e in entries for label in e.labels})
    for label in only:
        if label not in valid:
            raise ConfigError(f"unknown variant '{label}' for {', '.join(names)}; choose one of {', '.join(map(repr, valid))}")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {seeds}")
    planned: dict[str, PlannedJob] = {}
    for entry in entries:
        settings = entry.settings(scale)
        for variant in entry.runnable():
            if only and variant.label not in only:
                continue
            for seed_index in range(entry.num_seeds(variant.label, scale, seeds)):
                cfg, spec, digest = jobs.for_variant(entry, variant.label, scale, overrides, seed_index)
                use = f"{entry.name}/{variant.label}/seed{seed_index}"
                required = entry.required_keys(cfg, variant.label)
                if digest in planned:
                    job = planned[digest]
                    job.uses.append(use)
                    job.required += [k for k in required if k not in job.required]
                    continue
                directory = store.result_dir(results_root, digest)
                planned[digest] = PlannedJob(digest, directory, spec, [use], required, settings.resources, "", cfg.seed)
    for job in planned.values():
        metrics = store.read_metrics(job.directory)
        missing = store.missing_keys(metrics, job.required) if metrics is not None else ["metrics.json"]
        if not missing:
            job.state = "cached"
        elif all(m.startswith("eval_protocol=") for m in missing):
            job.state = "stale"
        else:
            job.state = "partial" if job.directory.exists() else "new"
    return list(planned.values())


def print_plan(jobs_: Sequence[PlannedJob], scale: str, out=None) -> None:
    out = out or sys.stdout
    todo = [j for j in jobs_ if j.state != "cached"]
    print(f"plan: {len(jobs_)} job(s) at scale '{scale}', {len(jobs_) - len(todo)} cached, {len(todo)} to run", file=out)
    for job in jobs_:
        res = job.resources
        print(f"  {job.digest}  {job.state:7s}  {job.spec['runner']:8s} seed={job.seed}  "
              f"[{res.get('nodes')}n x {res.get('gpus_per_node')}gpu, {res.get('cpus_per_task')}cpu, "
              f"{res.get('mem_gb')}G, {res.get('time_min')}min]  {', '.join(job.uses)}", file=out)


def random_init_note(jobs_: Sequence[PlannedJob]) -> str:
    """A warning line when jobs to run would train on a real dataset (COCO or a custom one) from a random ResNet: the
    paper starts from ImageNet, which only a local weights file can give here (nothing is downloaded)."""
    unset = sum(starts_from_random_weights(from_dict(j.spec.get("config", {}))) for j in jobs_ if j.state != "cached")
    return (f"warning: {unset} job(s) to run train on a real dataset from a randomly initialised ResNet, the paper from "
            "ImageNet: add model.backbone.weights=/path/to/resnet50.pth (a torchvision state dict of that ResNet) "
            "or pretrain.enabled=true") if unset else ""


def list_entries(out=None) -> None:
    out = out or sys.stdout
    for name in registry.names():
        entry = registry.get(name)
        print(f"{name}: {entry.title}  [{entry.source.get('table')}, {entry.source.get('split')}]", file=out)
        for v in entry.variants:
            tag = "reported only" if v.reported_only else f"runner {v.runner}"
            default = ", default" if v.label == entry.default else ""
            shown = ", ".join(f"{k}={val}" for k, val in v.overrides.items()) or "-"
            print(f"    {v.label:20s} ({tag}{default})  overrides: {shown}", file=out)


def execute_plan(jobs_: Sequence[PlannedJob], executor_name: str, results_root: Path,
                 max_parallel: int | None = None, out=None, executor_options: dict | None = None) -> dict[str, Any]:
    from experiments.launch import Task, make_executor

    out = out or sys.stdout
    todo = [j for j in jobs_ if j.state != "cached"]
    tasks = [Task(j.digest, j.uses[0], jobs.execute, (j.spec, str(j.directory), j.required), j.resources) for j in todo]
    executor = make_executor(executor_name, results_root / "_submitit", max_parallel, **(executor_options or {}))
    index = {t.key: i + 1 for i, t in enumerate(tasks)}
    planned = {j.digest: j for j in todo}
    counts = {"finished": 0, "failed": 0}
    start = time.perf_counter()

    def progress(task, event, outcome):
        prefix = f"[{index[task.key]}/{len(tasks)}] {task.key} {task.name}"
        if event == "start":
            print(f"{prefix}: started", file=out, flush=True)
            return
        if event == "running":
            line = training_progress(planned[task.key])
            if line:
                print(f"{prefix}: {line}", file=out, flush=True)
            return
        counts["finished"] += 1
        counts["failed"] += outcome.status == "failed"
        detail = f" ({outcome.error})" if outcome.error else ""
        print(f"{prefix}: {outcome.status} in {outcome.wall_s:.1f} s{detail} | overall {counts['finished']}/{len(tasks)} "
              f"finished, {counts['failed']} failed, {time.perf_counter() - start:.0f} s elapsed", file=out, flush=True)

    outcomes = executor.run(tasks, progress) if tasks else {}
    return outcomes


def training_progress(job: PlannedJob) -> str:
    """"iteration I/N, S s/it, ~M min to go" from the last line of a running job's metrics.jsonl ("" if none)."""
    try:
        with open(job.directory / "metrics.jsonl", "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            last = json.loads(handle.read().decode(errors="replace").strip().splitlines()[-1])
        done, per_it = int(last["iteration"]), float(last["time_s"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""
    total = int(job.spec.get("config", {}).get("solver", {}).get("max_iter", done))
    return f"iteration {done}/{total}, {per_it:.2f} s/it, ~{max(0, total - done) * per_it / 60:.0f} min of training to go"


def job_progress(job: PlannedJob) -> str:
    """How far a job that is not complete got: the status its last attempt recorded and its training progress."""
    record = store.read_json(job.directory / "run.json")
    parts = [f"run.json: {record['status']}"] if isinstance(record, dict) and record.get("status") else []
    if line := training_progress(job):
        parts.append(line)
    return "; ".join(parts)


def report_path_stem(name: str, scale: str) -> str:
    return name if scale == "smoke" else f"{name}-{scale}"


def _is_override(token: str) -> bool:
    """``key=value`` whose key starts with a top-level config field (``l=40`` is a label, not an override)."""
    from istr.config import Config

    key = token.split("=", 1)[0]
    return "=" in token and key.split(".")[0] in {f.name for f in dataclasses.fields(Config)}


def _exit_on_sigterm(signum, frame):
    """SIGTERM (kill, a closing terminal session) unwinds like Ctrl-C: the running job records its attempt as
    stopped, with its wall time, and its lock is released; the training loop saves its last completed iteration
    as it unwinds, and the next run resumes from there."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="an experiment (see --list) or 'all'")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides key=value applied to every variant, e.g. solver.max_iter=500 "
                             "(they change each job's hash: a different job, cached apart)")
    parser.add_argument("--scale", default="smoke",
                        help="tiny (CI plumbing, seconds), smoke (this CPU, the default) or paper (COCO, GPUs)")
    parser.add_argument("--executor", default="local",
                        help="debug (in this process), local (submitit's local executor, the default) or slurm")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (jobs, hashes, cached or not, resources) and run nothing")
    parser.add_argument("--estimate", action="store_true",
                        help="time a few training iterations and val images of each job to run, on this machine, print "
                             "how long the plan would take here, and run nothing (seconds per distinct job)")
    parser.add_argument("--list", action="store_true", help="list the experiments and their variants")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per variant (default: the registry's; the default variant gets at least 3 at smoke)")
    parser.add_argument("--results-root", default=None,
                        help="where results/<hash>/ directories live (default $ISTR_RESULTS, else results/)")
    parser.add_argument("--reports-dir", default="reports", help="where <name>.md and figures/ are written")
    parser.add_argument("--only", nargs="+", default=[], metavar="LABEL",
                        help="run only these variants (labels as printed by --list)")
    parser.add_argument("--max-parallel", type=int, default=None, help="local executor: jobs at once; slurm: array parallelism")
    parser.add_argument("--status", action="store_true", help="show each job's state and stop")
    slurm_executor.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    if args.list:
        list_entries()
        return 0
    try:
        if not args.name:
            raise ConfigError(f"name an experiment; choose one of {', '.join(registry.names())}, all")
        if args.name != "all" and args.name not in registry.names():
            raise ConfigError(f"unknown experiment '{args.name}'; choose one of {', '.join(registry.names())}, all")
        names = list(registry.names()) if args.name == "all" else [args.name]
        if args.scale not in registry.SCALES:
            raise ConfigError(f"unknown scale '{args.scale}'; choose one of {', '.join(registry.SCALES)}")
        from experiments.launch import EXECUTORS  # light: submitit is imported only when a local run starts

        if args.executor not in EXECUTORS:
            raise ConfigError(f"unknown executor '{args.executor}'; choose one of {', '.join(EXECUTORS)}")
        only = [t for t in args.only if not _is_override(t)]  # `--only l=40 a.b=1`: a.b=1 is an override
        overrides = [t for t in args.only if _is_override(t)] + list(args.overrides)
        root = store.results_root(args.results_root)
        planned = plan(names, args.scale, root, args.seeds, only, overrides)
        executor_options = slurm_executor.options_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.status:
        slurm_executor.print_status(planned, slurm_executor.job_folder(args.slurm_folder, root / "_submitit"),
                                    progress=job_progress)
        return 0
    print_plan(planned, args.scale)
    if note := random_init_note(planned):
        print(note, file=sys.stderr)
    if args.dry_run:
        return 0
    if args.estimate:
        from experiments import estimate

        print(estimate.describe(planned, args.executor, log=lambda line: print(line, file=sys.stderr)))
        return 0
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        outcomes = execute_plan(planned, args.executor, root, args.max_parallel, executor_options=executor_options)
    except ConfigError as err:  # e.g. SLURM refused the first array (bad partition, impossible resources)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [k for k, o in outcomes.items() if o.status == "failed"]
    from experiments import report

    for name in names:
        path = report.write_report(name, args.scale, root, args.reports_dir, seeds=args.seeds, overrides=overrides)
        print(f"report: {path}")
    if failed:
        print(f"{len(failed)} job(s) failed: {', '.join(failed)} (see results/<hash>/run.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
