"""pytest-benchmark: the runner's dry run, a user's command from a fresh interpreter (issue 10: under 2 seconds).

    .venv/bin/python -m pytest benchmarks/test_run.py --benchmark-only

tests/test_run.py checks what keeps it fast (no heavy library imported) without timing anything.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 2.0


def test_dry_run_of_everything(benchmark, tmp_path):
    env = {**os.environ, "ISTR_RESULTS": str(tmp_path / "results")}
    command = [sys.executable, "-m", "experiments.run", "all", "--dry-run", "--reports-dir", str(tmp_path / "r")]

    def dry_run():
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    out = benchmark.pedantic(dry_run, rounds=5, warmup_rounds=1, iterations=1)
    assert out.returncode == 0, out.stderr
    median = benchmark.stats.stats.median
    assert median < LIMIT_S, f"dry run median {median:.2f} s, limit {LIMIT_S} s"
