"""One job = one runner call on one config, into its result directory.

A spec is ``{"runner": name, "config": istr.config.to_dict(cfg), "options": {...}}`` (options only for
runners that take them, e.g. latency). ``execute(spec, output_dir, required)`` is what every executor
runs: it takes the directory's lock, skips a complete result, otherwise calls the runner and checks that
it left a complete metrics.json. Runners are imported only when a job runs.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from istr.config import ConfigError, dump, from_dict, to_dict
from istr.engine.hardware import cpu_model, native_bf16

from experiments import store

# name -> "module:function" (or the function itself), called as fn(cfg, output_dir) or fn(cfg, output_dir, options)
RUNNERS: dict[str, str | Callable[..., Any]] = {
    "istr": "istr.engine.job:train_and_evaluate",
    "maskrcnn": "baselines.maskrcnn:train_and_evaluate",
    "pca": "istr.engine.job:fit_pca_job",
    "latency": "baselines.latency:run_latency",
}


class JobError(RuntimeError):
    """A runner finished without a complete metrics.json."""


def make_spec(runner: str, config: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any]:
    if runner not in RUNNERS:
        raise ConfigError(f"unknown runner '{runner}'; choose one of {', '.join(RUNNERS)}")
    spec = {"runner": runner, "config": config}
    if options:
        spec["options"] = dict(options)
    return spec


def for_variant(entry, label: str, scale: str, overrides: Sequence[str] = (), seed_index: int = 0):
    """``(cfg, spec, hash)`` of one seed of one variant of a registry entry."""
    cfg = entry.resolve(label, scale, overrides, seed_index)
    spec = make_spec(entry.variant(label).runner, to_dict(cfg), entry.job_options(label, scale))
    return cfg, spec, store.spec_hash(spec)


def runner_function(name: str) -> Callable[..., Any]:
    if name not in RUNNERS:
        raise ConfigError(f"unknown runner '{name}'; choose one of {', '.join(RUNNERS)}")
    target = RUNNERS[name]
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def execute(spec: dict[str, Any], output_dir: str | Path, required: Iterable[Sequence[str]] = ()) -> dict[str, Any]:
    """Run ``spec`` into ``output_dir`` unless it is complete or running elsewhere.

    Returns ``{"status": "done" | "cached" | "busy", "wall_s": float}``; raises the runner's exception
    (after recording it in run.json) or JobError when the metrics are incomplete.
    """
    from filelock import Timeout

    output_dir = Path(output_dir)
    required = [tuple(k) for k in required]
    if int(os.environ.get("RANK", "0")) > 0:  # a multi-task SLURM job: only rank 0 keeps the books
        return _execute_other_rank(spec, output_dir, required)
    lock = store.lock(output_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return {"status": "busy", "wall_s": 0.0}
    try:
        if store.is_complete(output_dir, required):
            return {"status": "cached", "wall_s": 0.0}
        (output_dir / "metrics.json").unlink(missing_ok=True)  # partial or corrupt: the runner rewrites it
        store.write_json_atomic(output_dir / "spec.json", spec)
        cfg = from_dict(spec["config"])
        run = {**provenance(), "hash": output_dir.name, "status": "running", "start": _now(),
               "attempts": _earlier_attempts(output_dir)}
        store.write_json_atomic(output_dir / "run.json", run)
        start = time.perf_counter()
        try:
            _call_runner(spec, cfg, output_dir)
            metrics = store.read_metrics(output_dir)
            missing = store.missing_keys(metrics, required) if metrics is not None else ["metrics.json"]
            if missing:
                raise JobError(f"runner '{spec['runner']}' left {output_dir} incomplete: missing {', '.join(missing)}")
        except BaseException as err:
            stopped = isinstance(err, (KeyboardInterrupt, SystemExit))  # Ctrl-C or SIGTERM: resumable, not broken
            run.update(status="stopped" if stopped else "failed", end=_now(), wall_s=time.perf_counter() - start,
                       error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            store.write_json_atomic(output_dir / "run.json", run)
            raise
        if not (output_dir / "config.yaml").exists():  # the engine writes its own (with the dataset's class count)
            tmp = output_dir / ".config.yaml.tmp"
            dump(cfg, tmp)
            os.replace(tmp, output_dir / "config.yaml")
        run.update(status="done", end=_now(), wall_s=time.perf_counter() - start)
        store.write_json_atomic(output_dir / "run.json", run)
        return {"status": "done", "wall_s": run["wall_s"]}
    finally:
        lock.release()


def _earlier_attempts(output_dir: Path) -> list[dict[str, Any]]:
    """The attempts recorded in an existing run.json (each the record it held, less its own history)."""
    previous = store.read_json(output_dir / "run.json")
    if not isinstance(previous, dict):
        return []
    earlier = previous.pop("attempts", [])
    return [*earlier, {k: v for k, v in previous.items() if k != "traceback"}]


def _call_runner(spec: dict[str, Any], cfg, output_dir: Path) -> None:
    function = runner_function(spec["runner"])
    function(*((cfg, output_dir, spec["options"]) if spec.get("options") else (cfg, output_dir)))


def _execute_other_rank(spec: dict[str, Any], output_dir: Path, required: list[tuple[str, ...]]) -> dict[str, Any]:
    """DDP rank > 0: trains beside rank 0 (which holds the lock and writes run.json), or skips with it."""
    if store.is_complete(output_dir, required):
        return {"status": "cached", "wall_s": 0.0}
    start = time.perf_counter()
    _call_runner(spec, from_dict(spec["config"]), output_dir)
    return {"status": "done", "wall_s": time.perf_counter() - start}


def provenance() -> dict[str, Any]:
    """Where and with what a job ran (read without importing torch)."""
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_native_bf16": native_bf16(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "git_commit": git_commit(),
    }


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short commit of this checkout (+dirty with uncommitted tracked changes outside reports/, which holds generated
    output: a report writing its own figures must not mark the harness dirty); read once per process."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
