"""The local SLURM test cluster itself (slurm/testcluster.py), against real daemons."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import astuple
from pathlib import Path

import pytest

import testcluster

pytestmark = pytest.mark.slurm
SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "testcluster.py"


def sacct_state(cluster, job_id: str) -> str:
    out = cluster.client("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State").stdout.split()
    return out[0] if out else ""


def wait_for_state(cluster, job_id: str, wanted: set[str], timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := sacct_state(cluster, job_id)) not in wanted:
        assert time.monotonic() < deadline, f"job {job_id} still '{state}' after {timeout_s} s"
        time.sleep(0.3)
    return state


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=90)


def test_sbatch_wrap_completes_with_output(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    done = slurm_cluster.client("sbatch", "--parsable", f"--output={out}", "--wrap",
                                "echo job $SLURM_JOB_ID on $SLURM_JOB_PARTITION", check=True)
    job_id = done.stdout.strip().split(";")[0]
    assert wait_for_state(slurm_cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    assert out.read_text().strip() == f"job {job_id} on {slurm_cluster.partition}"


@pytest.mark.parametrize("flags, reason", [
    (["-p", "nosuchpart"], "Invalid partition name specified"),
    (["--mem", "{too_much_mem}M"], "Requested node configuration is not available"),
    (["-c", "{too_many_cpus}"], "More processors requested than permitted"),
    (["-N", "2"], "Node count specification invalid"),
])
def test_impossible_requests_fail_fast_with_slurms_reason(slurm_cluster, flags, reason):
    flags = [f.format(too_much_mem=slurm_cluster.memory_mb + 1, too_many_cpus=slurm_cluster.cpus + 1) for f in flags]
    began = time.monotonic()
    done = slurm_cluster.client("sbatch", *flags, "--wrap", "true")
    assert time.monotonic() - began < 5
    assert done.returncode == 1
    assert reason in done.stderr


def test_start_again_is_a_no_op(slurm_cluster):
    before = slurm_cluster.running()
    assert set(before) == set(testcluster.DAEMONS)
    slurm_cluster.start()
    assert slurm_cluster.running() == before


def test_refuses_ports_in_use_and_writes_nothing(slurm_cluster, tmp_path):
    state = tmp_path / "other"
    with pytest.raises(testcluster.ClusterError, match="port\\(s\\) already in use: slurmctld="):
        testcluster.TestCluster(state, ports=slurm_cluster.ports).start()
    assert not state.exists()
    done = cli("start", "--state", str(state), "--ports", ",".join(map(str, astuple(slurm_cluster.ports))))
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "already in use" in done.stderr


def test_bad_ports_argument_is_one_line():
    done = cli("status", "--state", "/nonexistent", "--ports", "1,2,x")
    assert done.returncode == 1
    assert done.stderr == "testcluster status: --ports '1,2,x': expected four port numbers CTLD,SLURMD,DBD,MARIADB\n"


def test_readiness_deadline_fails_with_log_tail_and_cleans_up(slurm_state_dir):
    if testcluster.missing_binaries():
        pytest.skip("SLURM binaries missing")
    cluster = testcluster.TestCluster(slurm_state_dir, timeout_s=0)
    with pytest.raises(testcluster.ClusterError, match="munged not ready within 0 s of the cluster start; log tail:"):
        cluster.start()
    assert cluster.running() == {}


def test_daemon_dying_at_start_fails_with_its_log_and_cleans_up(slurm_cluster, slurm_state_dir, monkeypatch):
    """A port taken between the check and the bind: mariadbd dies, munged (already up) is stopped again."""
    monkeypatch.setattr(testcluster, "port_is_free", lambda port: True)
    cluster = testcluster.TestCluster(slurm_state_dir, ports=slurm_cluster.ports)
    with pytest.raises(testcluster.ClusterError, match="(?s)mariadbd exited with code 1 during start; log tail:.*"
                                                       "Address already in use"):
        cluster.start()
    assert cluster.running() == {}
    assert slurm_cluster.client("sinfo", "-h", "-o", "%t").stdout.strip() == "idle"


def job_processes(conf: Path) -> list[int]:
    """PIDs of processes that run a job of the cluster configured by ``conf``."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            values = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_CONF={conf}".encode() in values and any(v.startswith(b"SLURM_JOB_ID=") for v in values):
            pids.append(int(environ.parent.name))
    return pids


def test_cli_stop_kills_only_its_own_cluster_and_restart_keeps_state(slurm_cluster, slurm_state_dir):
    state = slurm_state_dir
    started = cli("start", "--state", str(state))
    assert started.returncode == 0, started.stderr
    second = testcluster.TestCluster(state)
    try:
        daemons = second.running()
        assert set(daemons) == set(testcluster.DAEMONS) and cli("status", "--state", str(state)).returncode == 0
        sbatch = ("sbatch", "--parsable", f"--output={state}/%j.out", "--wrap")
        first_job = second.client(*sbatch, "sleep 300", check=True).stdout.strip()
        wait_for_state(second, first_job, {"RUNNING"})
        assert job_processes(second.conf)
        session_daemons = slurm_cluster.running()

        stopped = cli("stop", "--state", str(state))
        assert stopped.returncode == 0, stopped.stderr
        assert all(testcluster.process_start_time(pid) is None for pid in daemons.values())
        assert job_processes(second.conf) == []
        assert cli("status", "--state", str(state)).returncode == 1
        assert slurm_cluster.running() == session_daemons
        assert slurm_cluster.client("sinfo", "-h", "-o", "%t").stdout.strip() == "idle"

        assert cli("start", "--state", str(state)).returncode == 0
        assert wait_for_state(second, first_job, {"CANCELLED"}) == "CANCELLED"  # accounting survived the restart
        next_job = second.client(*sbatch, "true", check=True).stdout.strip()
        assert int(next_job) > int(first_job)
    finally:
        assert cli("stop", "--state", str(state)).returncode == 0
    assert second.running() == {}
    assert not (state / "run" / "daemons.json").exists()


def test_sbatch_template_trains_and_requeues_itself_on_the_time_limit_signal(slurm_cluster, tmp_path):
    """slurm/istr.sbatch: USR1 (what --signal=B:USR1@300 sends) -> requeue -> training resumes from its checkpoint."""
    out, log = tmp_path / "job.out", tmp_path / "run" / "log.txt"
    job_id = slurm_cluster.client(
        "sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G", "--time=10", f"--output={out}",
        str(SCRIPT.parent / "istr.sbatch"), "--scale", "tiny", "--output-dir", str(tmp_path / "run"),
        "solver.max_iter=24", "solver.checkpoint_period=5", check=True).stdout.strip()
    deadline = time.monotonic() + 120
    while not (log.exists() and b"iter 12/24" in log.read_bytes()):
        assert time.monotonic() < deadline and sacct_state(slurm_cluster, job_id) in ("", "PENDING", "RUNNING")
        time.sleep(0.3)
    slurm_cluster.client("scancel", "--batch", "--signal=USR1", job_id, check=True)
    assert wait_for_state(slurm_cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "COMPLETED"
    # stdout and stderr share the file and SLURM forwards each in chunks: a log line can land inside one of
    # tqdm's multi-byte bar characters (seen: bytes of U+2588 split by an INFO line)
    text = out.read_bytes().decode(errors="replace")
    assert f"time limit near, requeueing job {job_id}" in text and f"job {job_id} run 2" in text
    assert "resumed from" in log.read_text() and (tmp_path / "run" / "metrics.json").is_file()
