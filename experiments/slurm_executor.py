"""``--executor slurm``: each table's jobs as one SLURM job array, through submitit.

Resources, later layers winning:

    registry scale resources (experiments/tables/*.yaml)  <-  user file (~/.config/istr/slurm.yaml or
    --slurm-config FILE; top-level keys, then ``scales: {<scale>: {...}}``)  <-  --slurm KEY=VALUE

Keys: nodes, gpus_per_node (= tasks per node: one process per GPU), cpus_per_task, mem_gb (per node),
time_min, partition, account, qos, constraint, array_parallelism, setup (shell lines run before the job),
sbatch (extra sbatch flags, also --sbatch FLAG[=VALUE]).

The submitit folder is ``--slurm-folder``, else ``$ISTR_SLURM_FOLDER``, else ``<results root>/_submitit``;
logs go to ``<folder>/<table>/<array id>_<task>/``, and ``<folder>/jobs/<hash>.json`` records which SLURM
job serves each result directory. A later ``experiments.run`` of the same plan attaches to recorded jobs
that are still queued or running instead of submitting them again, and resubmits only the ones that
ended without a complete result (cancelled, failed, timed out too often).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from istr.config import ConfigError, parse_value

from experiments import store
from experiments.launch import Executor, Heartbeat, Outcome, Progress, Task, _exception_line, _outcome

USER_CONFIG = Path("~/.config/istr/slurm.yaml")
FOLDER_ENV = "ISTR_SLURM_FOLDER"
RESOURCE_TYPES: dict[str, type] = {
    "nodes": int, "gpus_per_node": int, "cpus_per_task": int, "mem_gb": float, "time_min": int,
    "partition": str, "account": str, "qos": str, "constraint": str, "array_parallelism": int,
    "setup": list, "sbatch": dict,
}
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                 "CONFIGURING", "COMPLETING", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED"}
VANISHED_AFTER_S = 30  # a submitted job has a sacct row within ~5 s; one that never gets one was cancelled


def _check_resources(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate keys and coerce types; ConfigError names ``where`` and the key."""
    checked = {}
    for key, value in values.items():
        if key not in RESOURCE_TYPES:
            raise ConfigError(f"{where}: unknown SLURM setting '{key}'; choose one of {', '.join(RESOURCE_TYPES)}")
        kind = RESOURCE_TYPES[key]
        if value is None or (isinstance(value, kind) if kind in (list, dict) else
                             not isinstance(value, (list, dict, bool))):
            try:
                checked[key] = value if value is None or kind in (list, dict) else kind(value)
                continue
            except ValueError:
                pass
        raise ConfigError(f"{where}: SLURM setting '{key}' must be {kind.__name__}, got {value!r}")
    return checked


def job_folder(flag: Optional[str], default: str | Path) -> Path:
    """--slurm-folder, else $ISTR_SLURM_FOLDER, else ``default`` (``<results root>/_submitit``)."""
    return Path(flag or os.environ.get(FOLDER_ENV) or default)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("SLURM executor (see experiments/slurm_executor.py and slurm/README.md)")
    group.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help=f"resource setting over the registry and the user file; keys: {', '.join(RESOURCE_TYPES)}")
    group.add_argument("--sbatch", action="append", default=[], metavar="FLAG[=VALUE]",
                       help="extra sbatch flag, e.g. --sbatch exclusive --sbatch mail-type=END")
    group.add_argument("--slurm-config", metavar="FILE", help=f"settings file (default {USER_CONFIG} if present)")
    group.add_argument("--slurm-folder", metavar="DIR",
                       help=f"submitit logs and job records (default ${FOLDER_ENV}, else <results root>/_submitit)")


def options_from_args(args) -> dict[str, Any]:
    """Executor keywords from the parsed command line; ConfigError on bad input (before anything runs)."""
    used = args.slurm or args.sbatch or args.slurm_config
    if args.executor != "slurm":
        if used:
            raise ConfigError("--slurm, --sbatch and --slurm-config apply to --executor slurm only")
        return {}
    settings = {**load_user_config(args.slurm_config, args.scale),
                **_check_resources(parse_assignments(args.slurm, "--slurm"), "--slurm")}
    settings["sbatch"] = {**(settings.get("sbatch") or {}), **parse_assignments(args.sbatch, "--sbatch", True)}
    return {"settings": settings, "slurm_folder": args.slurm_folder}


def load_user_config(path: Optional[str], scale: str) -> dict[str, Any]:
    """The user file's settings for ``scale`` ({} when there is no file and none was asked for)."""
    file = Path(path) if path else USER_CONFIG.expanduser()
    if not file.is_file():
        if path:
            raise ConfigError(f"--slurm-config {path}: no such file")
        return {}
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of SLURM settings")
    scales = data.pop("scales", None) or {}
    if not isinstance(scales, dict) or not isinstance(scales.get(scale, {}), dict):
        raise ConfigError(f"{file}: 'scales' must map a scale name to SLURM settings")
    return {**_check_resources(data, str(file)), **_check_resources(scales.get(scale, {}), f"{file} scales.{scale}")}


def parse_assignments(items: Sequence[str], flag: str, bare_is_true: bool = False) -> dict[str, Any]:
    """``["partition=gpu", "exclusive"]`` -> {"partition": "gpu", "exclusive": True} (bare only if allowed)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or (not sep and not bare_is_true):
            raise ConfigError(f"{flag} {item}: expected KEY=VALUE")
        parsed[key] = parse_value(value) if sep else True
    return parsed


def submitit_parameters(resources: dict[str, Any]) -> dict[str, Any]:
    """Registry/user resources -> ``submitit.SlurmExecutor.update_parameters`` keywords."""
    gpus = int(resources.get("gpus_per_node") or 0)
    params: dict[str, Any] = {
        "nodes": int(resources.get("nodes") or 1),
        "ntasks_per_node": max(1, gpus),  # one training process per GPU, DDP across them
        "cpus_per_task": int(resources.get("cpus_per_task") or 1),
        "time": int(resources.get("time_min") or 60),
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if resources.get("mem_gb"):
        mem = float(resources["mem_gb"])
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint", "array_parallelism", "setup"):
        if resources.get(key) is not None:
            params[key] = resources[key]
    if resources.get("sbatch"):
        params["additional_parameters"] = dict(resources["sbatch"])
    return params


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Job id -> SLURM state from sacct (ids without a row are absent); raises RuntimeError when sacct fails."""
    if not job_ids:
        return {}
    done = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"sacct failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.partition("|")
        for one in _expand_array_id(job_id):
            states[one] = state.split()[0] if state else "UNKNOWN"
    return states


def _expand_array_id(job_id: str) -> list[str]:
    """``"7_[0-2,5%2]"`` (array tasks not yet started share one sacct row) -> 7_0, 7_1, 7_2, 7_5."""
    base, sep, spec = job_id.partition("_[")
    if not sep:
        return [job_id]
    ids = []
    for part in spec.rstrip("]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def _in_queue(job_id: str) -> bool:
    done = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job_id], capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and bool(done.stdout.strip())


class SlurmExecutor(Executor):
    name = "slurm"
    heartbeat_s = 300.0  # how often running jobs report their training progress

    def __init__(self, folder: str | Path, max_parallel: int | None = None, settings: Optional[dict] = None,
                 slurm_folder: Optional[str] = None):
        super().__init__(job_folder(slurm_folder, folder), max_parallel)
        self.settings = settings or {}  # user file <- --slurm <- --sbatch, from options_from_args

    def resources(self, task: Task) -> dict[str, Any]:
        merged = {**task.resources, **self.settings}
        if self.max_parallel and "array_parallelism" not in self.settings:
            merged["array_parallelism"] = self.max_parallel
        return merged

    # ------------------------------------------------------------------ records of submitted jobs
    def record_path(self, key: str) -> Path:
        return self.folder / "jobs" / f"{key}.json"

    def record(self, key: str) -> Optional[dict[str, Any]]:
        return store.read_json(self.record_path(key))

    def active_records(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Recorded jobs still queued or running: a later run waits for these instead of submitting again."""
        records = {k: r for k in keys if (r := self.record(k)) is not None}
        states = slurm_states([r["job_id"] for r in records.values()]) if records else {}
        return {k: r for k, r in records.items()
                if states.get(r["job_id"]) in ACTIVE_STATES or (r["job_id"] not in states and _in_queue(r["job_id"]))}

    # ------------------------------------------------------------------ submit and wait
    def run(self, tasks: Sequence[Task], progress: Progress) -> dict[str, Outcome]:
        import submitit
        watching: dict[str, tuple[Task, Any, float]] = {}
        outcomes: dict[str, Outcome] = {}
        active = self.active_records([t.key for t in tasks])
        for task in tasks:
            if task.key in active:
                record = active[task.key]
                job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"])
                print(f"{task.key} {task.name}: attached to SLURM job {job.job_id} (submitted earlier); "
                      f"log {job.paths.stdout}", flush=True)
                watching[task.key] = (task, job, time.monotonic())
                progress(task, "start", None)
        groups: dict[tuple, list[Task]] = defaultdict(list)
        for task in tasks:
            if task.key not in active:
                resources = self.resources(task)
                groups[(task.name.split("/")[0], repr(sorted(resources.items())))].append(task)
        for (table, _), group in groups.items():
            for task, job in zip(group, self._submit_array(table, group, bool(watching or outcomes))):
                if isinstance(job, Outcome):
                    outcomes[task.key] = job
                    progress(task, "start", None)
                    progress(task, "end", job)
                else:
                    watching[task.key] = (task, job, time.monotonic())
                    progress(task, "start", None)
        outcomes.update(self._wait(watching, progress))
        return outcomes

    def _submit_array(self, table: str, group: list[Task], others_submitted: bool) -> list[Any]:
        """Submit ``group`` as one array; returns its jobs, or a failed Outcome per task if sbatch refused it.

        A refusal of the first array (nothing submitted yet) is bad input: ConfigError with SLURM's reason.
        """
        import submitit

        from experiments.slurm_job import ResumableCall

        resources = self.resources(group[0])
        executor = submitit.SlurmExecutor(folder=self.folder / table / "%j")
        executor.update_parameters(job_name=f"istr-{table}", **submitit_parameters(resources))
        calls = [ResumableCall(task.fn, *task.args) for task in group]
        try:
            with executor.batch():
                jobs = [executor.submit(call) for call in calls]
        except submitit.core.utils.FailedJobError as err:
            reason = " | ".join(line.strip() for line in str(err).splitlines() if "sbatch: error" in line)
            message = f"SLURM refused the {table} array: {reason or str(err).strip().splitlines()[-1]}"
            if not others_submitted:
                raise ConfigError(message) from None
            return [Outcome("failed", 0.0, message) for _ in group]
        array_id = jobs[0].job_id.split("_")[0]
        print(f"submitted {table}: SLURM array {array_id} ({len(jobs)} task(s), "
              f"{resources.get('array_parallelism') or 'no'} limit at once); logs {self.folder / table}/"
              f"{array_id}_<task>/", flush=True)
        for task, job in zip(group, jobs):
            store.write_json_atomic(self.record_path(task.key), {
                "job_id": job.job_id, "folder": str(self.folder / table / "%j"), "name": task.name,
                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "submitted": time.time()})
            print(f"  {job.job_id}  {task.key}  {task.name}  log {job.paths.stdout}", flush=True)
        return jobs

    def _wait(self, watching: dict[str, tuple[Task, Any, float]], progress: Progress) -> dict[str, Outcome]:
        import submitit

        outcomes: dict[str, Outcome] = {}
        began, beat = time.monotonic(), Heartbeat(self.heartbeat_s)
        while watching:
            # One sacct call for all jobs; polls get sparser as the wait grows (1 s at first, 30 s at most).
            time.sleep(min(30.0, max(1.0, (time.monotonic() - began) / 10)))
            submitit.SlurmJob.watcher.update()
            for key, (task, job, start) in list(watching.items()):
                if job.done():
                    outcome = self._collect(job, start)
                elif time.monotonic() - start > VANISHED_AFTER_S and not self._known(job.job_id):
                    outcome = Outcome("failed", time.monotonic() - start,
                                      f"SLURM job {job.job_id} vanished before it ran (cancelled while pending?)")
                else:
                    continue
                del watching[key]
                outcomes[key] = outcome
                progress(task, "end", outcome)
            beat([task for task, _, _ in watching.values()], progress)
        return outcomes

    @staticmethod
    def _collect(job: Any, start: float) -> Outcome:
        try:
            return _outcome(job.result())
        except Exception as err:  # FailedJobError, UncompletedJobError (cancelled, timed out too often)
            state = job.watcher.get_state(job.job_id, mode="cache")  # may lag behind a job that just failed
            shown = "" if state in ACTIVE_STATES or state == "UNKNOWN" else f" {state}"
            return Outcome("failed", time.monotonic() - start, f"SLURM job {job.job_id}{shown}: {_exception_line(err)}")

    @staticmethod
    def _known(job_id: str) -> bool:
        """Queued, or with a sacct row: a pending array task cancelled before it ran has neither."""
        try:
            return _in_queue(job_id) or job_id in slurm_states([job_id])
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            return True  # SLURM not answering is no evidence; ask again at the next poll


def print_status(planned: Sequence[Any], folder: str | Path, out=None,
                 progress: Callable[[Any], str] = lambda job: "") -> None:
    """One line per planned job: complete, or the recorded SLURM job's state and log, or not submitted; then what
    ``progress(job)`` says of a job that is not complete (e.g. how far its training got)."""
    out = out or sys.stdout
    executor_records = {job.digest: store.read_json(Path(folder) / "jobs" / f"{job.digest}.json") for job in planned}
    ids = [r["job_id"] for r in executor_records.values() if r]
    try:
        states = slurm_states(ids)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        states, note = {}, f"unknown ({err})"
    else:
        note = "no accounting record"
    for job in planned:
        record = executor_records[job.digest]
        if job.state == "cached":
            state, detail = "COMPLETE", ""
        elif record:
            state = states.get(record["job_id"], note)
            detail = f"  job {record['job_id']}  log {record['stdout']}"
        else:
            state, detail = "NOT SUBMITTED" if job.state == "new" else "INCOMPLETE", ""
        if job.state != "cached" and (line := progress(job)):
            detail += f"  {line}"
        print(f"  {job.digest}  {state:14s} {', '.join(job.uses)}{detail}", file=out)
