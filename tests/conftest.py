"""Shared pytest fixtures.

``slurm_cluster``: one real single-node SLURM cluster (slurm/testcluster.py) for the whole session,
started only when a test asks for it and stopped at the end (only the processes it started).
Without the SLURM binaries the tests that need it skip, unless ISTR_REQUIRE_SLURM=1 (set by .ci/run).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "slurm"))

import testcluster  # noqa: E402  (slurm/ is a directory of scripts, not a package)


def open_temp_dir() -> Path:
    """A fresh directory outside pytest's basetemp (0700): munged wants o+x on every directory above its socket."""
    path = Path(tempfile.mkdtemp(prefix="istr-slurm-"))
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def slurm_state_dir() -> Path:
    """An empty directory for a test's own extra cluster."""
    path = open_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> testcluster.TestCluster:
    missing = testcluster.missing_binaries()
    if missing:
        message = f"SLURM binaries missing: {', '.join(missing)}"
        if os.environ.get("ISTR_REQUIRE_SLURM") == "1":
            pytest.fail(f"{message} (ISTR_REQUIRE_SLURM=1)", pytrace=False)
        pytest.skip(message)
    state = open_temp_dir()
    cluster = testcluster.TestCluster(state)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch) -> testcluster.TestCluster:
    """The session cluster, with SLURM_CONF set for this test only (submitit calls sbatch/sacct with os.environ)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


@pytest.fixture
def one_thread():
    """Small models run fastest on one thread on the shared 2-core CPU; the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
