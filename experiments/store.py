"""Result directories keyed by a canonical hash of the job spec.

    results/<hash>/spec.json      the job spec {runner, config, options}: what was hashed
    results/<hash>/config.yaml    the config as run (the engine's, else written by jobs.execute at the end)
    results/<hash>/run.json       status, host, versions, start/end, wall time (written by jobs.execute)
    results/<hash>/metrics.json   written by the runner, last: its presence with every required key = complete
    results/<hash>/.lock          held (filelock) while a process runs the job

A directory whose metrics.json is missing, unparsable or lacks a required key is incomplete and is run
again (the runner resumes from its checkpoints); a complete one is never run again. A detector's metrics
(they hold "final") evaluated under an older ``istr.config.EVAL_PROTOCOL`` are incomplete too: the
runner finds training finished and only evaluates again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

HASH_LENGTH = 12
DEFAULT_ROOT = "results"
IDENTITY_KEYS = ("runner", "config", "options")  # what makes two jobs the same job


def canonical_json(spec: dict[str, Any]) -> str:
    """Sorted keys, no whitespace, tuples as lists: equal specs give equal text whatever their key order.

    Config keys of ``istr.config.ADDED_KEYS`` are left out while they hold their old-behaviour value, so
    adding a config key does not change the hash of any job that existed before it.
    """
    identity = {k: spec[k] for k in IDENTITY_KEYS if spec.get(k) not in (None, {})}
    if isinstance(identity.get("config"), dict):
        identity["config"] = _without_added_defaults(identity["config"])
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list, allow_nan=True)


def _without_added_defaults(config: dict[str, Any]) -> dict[str, Any]:
    from istr.config import ADDED_KEYS

    config = copy.deepcopy(config)
    for key, value in ADDED_KEYS.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == value:
            del node[leaf]
    return config


def spec_hash(spec: dict[str, Any]) -> str:
    """First 12 hex digits of sha256 over the canonical JSON of the spec's identity keys."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:HASH_LENGTH]


def results_root(path: Optional[str] = None) -> Path:
    """``path``, else ``$ISTR_RESULTS``, else ``results/``."""
    return Path(path or os.environ.get("ISTR_RESULTS") or DEFAULT_ROOT)


def result_dir(root: str | Path, digest: str) -> Path:
    return Path(root) / digest


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, then ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report_or_print(text: str, out: Optional[str]) -> None:
    """A command's markdown report: ``OUT.md`` written atomically (and its path printed) when ``out`` is given,
    else the text on stdout."""
    if out:
        path = f"{out}.md"
        write_text_atomic(path, text)
        print(f"wrote {path}")
    else:
        print(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=list) + "\n")


def read_json(path: str | Path) -> Optional[Any]:
    """Parsed JSON, or None when the file is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def lookup(metrics: Any, key: Sequence[str]) -> Any:
    """``metrics[k0][k1]...``; KeyError/TypeError when a level is missing."""
    node = metrics
    for part in key:
        node = node[part]
    return node


def missing_keys(metrics: Any, required: Iterable[Sequence[str]]) -> list[str]:
    """The required key paths (dotted) that ``metrics`` lacks or holds as a non-number, and
    ``eval_protocol=N`` when a detector's metrics come from an older evaluation protocol."""
    from istr.config import EVAL_PROTOCOL, stale_evaluation

    missing = []
    if stale_evaluation(metrics):
        missing.append(f"eval_protocol={EVAL_PROTOCOL} (evaluated under {metrics.get('eval_protocol', 1)})")
    for key in required:
        try:
            value = lookup(metrics, key)
        except (KeyError, TypeError, IndexError):
            missing.append(".".join(key))
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float, list)):
            missing.append(".".join(key))
    return missing


def read_metrics(directory: str | Path) -> Optional[dict[str, Any]]:
    data = read_json(Path(directory) / "metrics.json")
    return data if isinstance(data, dict) else None


def is_complete(directory: str | Path, required: Iterable[Sequence[str]]) -> bool:
    metrics = read_metrics(directory)
    return metrics is not None and not missing_keys(metrics, required)


def missing_run_files(run_dir: str | Path, names: Sequence[str]) -> Optional[str]:
    """Why ``run_dir`` cannot serve a tool that reads ``names`` (one line), or None when it can.

    A finished job under a tracked root (reports/results) keeps only its text records in git; its checkpoints
    and detections stay on the machine that ran it, so the message says so instead of calling it unfinished."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return f"{run_dir}: no such result directory"
    missing = [name for name in names if not (run_dir / name).is_file()]
    if not missing:
        return None
    if read_metrics(run_dir) is not None:
        return (f"{run_dir}: no {', '.join(missing)}: the job is finished, but these files stay on the machine that "
                "ran it (git tracks only its text records); train it again under another --results-root to get them")
    return f"{run_dir}: no {', '.join(missing)} (not a finished result directory)"


def lock(directory: str | Path):
    """An exclusive, inter-process lock on a result directory (``with store.lock(d).acquire(timeout=0):``)."""
    from filelock import FileLock

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / ".lock"))


def config_differences(run_dirs: Sequence[str | Path]) -> list[str]:
    """For each run directory, ``"key=value, ..."`` over the config keys whose values differ between the runs'
    ``config.yaml`` files (empty when they agree, or for a single run): what a side-by-side report compares."""
    import yaml

    from istr.dataclass_tree import flatten

    def as_text(run: str | Path) -> dict[str, str]:
        tree = flatten(yaml.safe_load((Path(run) / "config.yaml").read_text()) or {})
        return {key: value if isinstance(value, str) else json.dumps(value) for key, value in tree.items()}

    configs = [as_text(run) for run in run_dirs]
    keys = sorted({k for c in configs for k in c if len({d.get(k) for d in configs}) > 1})
    return [", ".join(f"{k}={c.get(k, 'unset')}" for k in keys) for c in configs]
