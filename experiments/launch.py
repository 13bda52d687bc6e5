"""Executors: where the jobs of a plan run.

    debug  in this process, one after the other (tracebacks surface directly; no pickling)
    local  submitit.LocalExecutor: one subprocess per job, at most ``max_parallel`` at a time
    slurm  submitit.SlurmExecutor: one job array per table (experiments/slurm_executor.py)

An executor takes ``Task``s (a picklable function and its arguments, plus the job's resources) and
reports each one's start and end through a callback; adding one (e.g. SLURM through
``submitit.AutoExecutor``) is a new ``Executor`` subclass and one line in ``EXECUTORS``.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from istr.config import ConfigError


@dataclass
class Task:
    key: str  # unique in a run (the result hash)
    name: str  # for humans and job names, e.g. "table1a/l=40/seed0"
    fn: Callable[..., Any]
    args: tuple = ()
    resources: dict[str, Any] = field(default_factory=dict)  # registry ScaleSettings.resources


@dataclass
class Outcome:
    status: str  # "done" | "cached" | "busy" | "failed"
    wall_s: float = 0.0
    error: str = ""


# (task, "start" | "running" | "end", outcome at the end); "running" comes every heartbeat_s while it runs
Progress = Callable[[Task, str, Outcome | None], None]


def _outcome(result: Any) -> Outcome:
    result = result if isinstance(result, dict) else {}
    return Outcome(status=result.get("status", "done"), wall_s=float(result.get("wall_s", 0.0)))


class Executor:
    name = "base"

    def __init__(self, folder: str | Path, max_parallel: int | None = None):
        self.folder = Path(folder)
        self.max_parallel = max_parallel

    def run(self, tasks: Sequence[Task], progress: Progress) -> dict[str, Outcome]:
        raise NotImplementedError


class DebugExecutor(Executor):
    name = "debug"

    def run(self, tasks: Sequence[Task], progress: Progress) -> dict[str, Outcome]:
        outcomes = {}
        for task in tasks:
            progress(task, "start", None)
            start = time.perf_counter()
            try:
                outcome = _outcome(task.fn(*task.args))
            except Exception as err:  # one failed job must not stop the others
                outcome = Outcome("failed", time.perf_counter() - start, f"{type(err).__name__}: {err}")
                traceback.print_exc()
            outcomes[task.key] = outcome
            progress(task, "end", outcome)
        return outcomes


class Heartbeat:
    """``beat(tasks, progress)`` reports each of ``tasks`` as "running" when ``period_s`` have passed since the
    last report (the runner then prints the job's training progress)."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.last = time.monotonic()

    def __call__(self, tasks: Sequence[Task], progress: Progress) -> None:
        if tasks and time.monotonic() - self.last >= self.period_s:
            self.last = time.monotonic()
            for task in tasks:
                progress(task, "running", None)


class LocalExecutor(Executor):
    """submitit's LocalExecutor; by default as many jobs at once as the CPU cores allow."""

    name = "local"
    poll_s = 0.5
    heartbeat_s = 60.0

    def run(self, tasks: Sequence[Task], progress: Progress) -> dict[str, Outcome]:
        import submitit

        executor = submitit.LocalExecutor(folder=str(self.folder / "%j"))
        pending, running, outcomes = list(tasks), {}, {}
        beat = Heartbeat(self.heartbeat_s)
        while pending or running:
            while pending and len(running) < self._parallel(pending[0]):
                task = pending.pop(0)
                executor.update_parameters(timeout_min=int(task.resources.get("time_min", 60)),
                                           gpus_per_node=int(task.resources.get("gpus_per_node", 0)))
                running[task.key] = (task, executor.submit(task.fn, *task.args), time.perf_counter())
                progress(task, "start", None)
            for key, (task, job, start) in list(running.items()):
                if not job.done():
                    continue
                del running[key]
                try:
                    outcome = _outcome(job.result())
                except Exception as err:
                    outcome = Outcome("failed", time.perf_counter() - start, _exception_line(err))
                outcomes[key] = outcome
                progress(task, "end", outcome)
            beat([task for task, _, _ in running.values()], progress)
            if running:
                time.sleep(self.poll_s)
        return outcomes

    def _parallel(self, task: Task) -> int:
        if self.max_parallel:
            return self.max_parallel
        return max(1, (os.cpu_count() or 1) // max(1, int(task.resources.get("cpus_per_task", 1))))


def _slurm_executor(folder: str | Path, max_parallel: int | None = None, **options: Any) -> Executor:
    from experiments.slurm_executor import SlurmExecutor  # a module of its own, loaded only when asked for

    return SlurmExecutor(folder, max_parallel, **options)


def _exception_line(err: Exception) -> str:
    """The job's own exception line out of submitit's FailedJobError (trace between dashed rules)."""
    parts = str(err).split("-" * 22)
    lines = [line.strip() for line in (parts[1] if len(parts) >= 3 else str(err)).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


EXECUTORS: dict[str, Callable[..., Executor]] = {"debug": DebugExecutor, "local": LocalExecutor,
                                                  "slurm": _slurm_executor}


def make_executor(name: str, folder: str | Path, max_parallel: int | None = None, **options: Any) -> Executor:
    """``options``: executor-specific keywords (slurm: experiments.slurm_executor.options_from_args)."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor '{name}'; choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name](folder, max_parallel, **options)
