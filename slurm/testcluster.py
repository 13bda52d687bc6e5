"""A real single-node SLURM cluster on loopback, for laptops and CI.

    python slurm/testcluster.py start  --state DIR [--ports CTLD,SLURMD,DBD,MARIADB] [--cpus N] [--memory-mb MB]
    python slurm/testcluster.py status --state DIR
    python slurm/testcluster.py stop   --state DIR

Five daemons (munged, mariadbd, slurmdbd, slurmctld, slurmd) run from a private state directory with
their own ports, so two clusters (or a CI run beside a laptop session) never meet. Clients find the
cluster through ``SLURM_CONF=DIR/etc/slurm.conf``, which is given only to the processes that need it.
Measured facts and pitfalls behind every choice here: ``shared/slurm-test-cluster.md``.

The same machinery is importable (``TestCluster``) for the pytest fixture in ``tests/conftest.py``.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

# slurm/ is a directory of scripts: run as a script or with slurm/ on sys.path (tests/conftest.py), its siblings import by name
from cluster_host import (DAEMONS, ClusterError, Ports, find_binary, host_memory_mb, log_tail, missing_binaries,
                          pick_free_ports, port_is_free, process_start_time, run_setup_step, write_atomic)

PARTITION = "debug"
NODE = socket.gethostname().split(".")[0]  # a resolvable node name: jobs use it as MASTER_ADDR for DDP
POLL_S = 0.1


class TestCluster:
    """One cluster, all of whose state lives under ``state_dir``.

    ``start()`` is idempotent (a running cluster is left alone) and restarts on an existing directory
    keep job ids and accounting. ``stop()`` cancels the jobs, then stops, in reverse order, only the
    processes recorded in ``state_dir/run/daemons.json`` (PID + kernel start time).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, state_dir: str | os.PathLike, ports: Optional[Ports] = None, cpus: Optional[int] = None,
                 memory_mb: Optional[int] = None, timeout_s: float = 30.0):
        self.state = Path(state_dir).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb or host_memory_mb()
        self.timeout_s = timeout_s
        self.user = getpass.getuser()
        self.conf = self.state / "etc" / "slurm.conf"
        self.partition = PARTITION
        self._requested_ports = ports
        self._popens: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ paths and environment
    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, sacct, submitit) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def munge_socket(self) -> Path:
        return self.state / "munge" / "munge.socket"

    @property
    def mariadb_socket(self) -> Path:
        return self.state / "mysql" / "mysqld.sock"

    @property
    def ports(self) -> Ports:
        """The ports in use: requested, else those of a previous start, else fresh free ones."""
        if self._requested_ports is None:
            saved = self.state / "etc" / "ports.json"
            self._requested_ports = Ports(**json.loads(saved.read_text())) if saved.exists() else pick_free_ports()
        return self._requested_ports

    def log_path(self, daemon: str) -> Path:
        return self.state / "log" / f"{daemon}.log"

    def client(self, *args: str, timeout: float = 10.0, check: bool = False) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``client("sinfo", "-h")``) against this cluster."""
        return subprocess.run([find_binary(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=check)

    # ------------------------------------------------------------------ process records
    def _records_path(self) -> Path:
        return self.state / "run" / "daemons.json"

    def _records(self) -> dict[str, dict]:
        path = self._records_path()
        return json.loads(path.read_text()) if path.exists() else {}

    def _alive(self, record: dict) -> bool:
        return record["start_time"] is not None and process_start_time(record["pid"]) == record["start_time"]

    def running(self) -> dict[str, int]:
        """Daemon -> PID for the recorded daemons still alive."""
        return {name: rec["pid"] for name, rec in self._records().items() if self._alive(rec)}

    # ------------------------------------------------------------------ start
    def start(self) -> "TestCluster":
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"SLURM test cluster: missing binaries {', '.join(missing)} "
                               "(apt-get install slurm-wlm slurmdbd munge mariadb-server)")
        alive = self.running()
        if set(alive) == set(DAEMONS):
            return self
        if alive:
            raise ClusterError(f"SLURM test cluster in {self.state} is half running ({', '.join(alive)}); "
                               "run 'stop' first")
        taken = [f"{name}={port}" for name, port in asdict(self.ports).items() if not port_is_free(port)]
        if taken:
            raise ClusterError(f"SLURM test cluster: port(s) already in use: {', '.join(taken)}; "
                               "choose others with --ports or stop whatever holds them")
        if len(str(self.munge_socket)) > 100:  # sun_path holds 108 bytes
            raise ClusterError(f"SLURM test cluster: state directory {self.state} is too long for a unix socket path")
        closed = [str(d) for d in self.state.parents if d.exists() and not os.stat(d).st_mode & 0o001]
        if closed:  # munged refuses a socket that not everybody can reach
            raise ClusterError(f"SLURM test cluster: munged needs o+x on every directory above {self.state}; "
                               f"not on {closed[0]}")
        self._prepare_files()
        deadline = time.monotonic() + self.timeout_s
        try:
            self._start_munged(deadline)
            self._start_mariadb(deadline)
            self._launch("slurmdbd", ["slurmdbd", "-D"], lambda: self._ok("sacctmgr", "-n", "show", "cluster"),
                         deadline)
            self._launch("slurmctld", ["slurmctld", "-D"], lambda: "UP" in self.client("scontrol", "ping").stdout,
                         deadline)
            self._launch("slurmd", ["slurmd", "-D", "-N", NODE], self._node_idle, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare_files(self) -> None:
        for sub in ("mysql", "etc", "log", "run", "spool/ctld", "spool/d"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        (self.state / "munge").mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.state / "munge", 0o755)  # munged refuses a socket directory without o+x
        key = self.state / "munge" / "munge.key"
        if not key.exists():
            run_setup_step([find_binary("mungekey"), "-c", "-k", str(key)], timeout=10)
        os.chmod(key, 0o600)
        password_file = self.state / "etc" / "db_password"
        if not password_file.exists():
            write_atomic(password_file, secrets.token_hex(12), 0o600)
        write_atomic(self.state / "etc" / "ports.json", json.dumps(asdict(self.ports)))
        write_atomic(self.state / "etc" / "slurmdbd.conf", self._slurmdbd_conf(password_file.read_text()), 0o600)
        write_atomic(self.conf, self._slurm_conf())

    def _slurmdbd_conf(self, password: str) -> str:
        s = self.state
        return "\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", f"SlurmUser={self.user}",
            "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={self.ports.slurmdbd}",
            f"LogFile={s}/log/slurmdbd.log", f"PidFile={s}/run/slurmdbd.pid",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={self.ports.mariadb}",
            "StorageUser=slurm", f"StoragePass={password}", "StorageLoc=slurm_acct_db", ""])

    def _slurm_conf(self) -> str:
        s, p = self.state, self.ports
        return "\n".join([
            "ClusterName=testcluster", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={p.slurmctld}", f"SlurmdPort={p.slurmd}",
            f"SlurmUser={self.user}", f"SlurmdUser={self.user}", "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire=10 (default 120) lets a requeued job run again after ~11 s instead of ~150 s.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={p.slurmdbd}",
            # The munge socket for connections to slurmdbd: AuthInfo is not used for those.
            f"AccountingStoragePass={self.munge_socket}",
            f"StateSaveLocation={s}/spool/ctld", f"SlurmdSpoolDir={s}/spool/d",
            f"SlurmctldPidFile={s}/run/slurmctld.pid", f"SlurmdPidFile={s}/run/slurmd.pid",
            f"SlurmctldLogFile={s}/log/slurmctld.log", f"SlurmdLogFile={s}/log/slurmd.log",
            "MailProg=/bin/true", "MpiDefault=none", "JobCompType=jobcomp/none",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/linux",
            "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=1000",
            # Without EnforcePartLimits=ALL, too many CPUs or nodes stay PENDING forever instead of failing.
            "EnforcePartLimits=ALL", "ReturnToService=2", "JobRequeue=1", "KillWait=5",
            # The node stays usable on a host smaller than configured.
            "SlurmdParameters=config_overrides",
            f"NodeName={NODE} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])

    def _start_munged(self, deadline: float) -> None:
        m = self.state / "munge"
        cmd = ["munged", "-F", "-S", str(self.munge_socket), f"--key-file={m}/munge.key",
               f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed", f"--log-file={m}/munged.log"]
        sock = str(self.munge_socket)
        self._launch("munged", cmd, lambda: subprocess.run(
            f"{find_binary('munge')} -n -S {sock} | {find_binary('unmunge')} -S {sock}", shell=True,
            capture_output=True, timeout=5).returncode == 0, deadline)

    def _start_mariadb(self, deadline: float) -> None:
        datadir = self.state / "mysql" / "data"
        initialised = self.state / "mysql" / "initialised"  # written last: a half-made datadir is redone
        if not initialised.exists():
            shutil.rmtree(datadir, ignore_errors=True)
            run_setup_step([find_binary("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}",
                         f"--user={self.user}", "--auth-root-authentication-method=normal", "--skip-test-db",
                         "--skip-name-resolve", "--innodb-log-file-size=16M"],
                        timeout=max(deadline - time.monotonic(), 1))
        cmd = ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--user={self.user}",
               f"--socket={self.mariadb_socket}", f"--port={self.ports.mariadb}", "--bind-address=127.0.0.1",
               f"--pid-file={self.state}/run/mariadbd.pid", f"--log-error={self.log_path('mariadbd')}",
               "--innodb-log-file-size=16M", "--skip-name-resolve"]
        admin = [find_binary("mariadb-admin"), "--no-defaults", "-S", str(self.mariadb_socket), "-uroot", "ping"]
        self._launch("mariadbd", cmd, lambda: subprocess.run(admin, capture_output=True, timeout=5).returncode == 0,
                     deadline)
        if not initialised.exists():
            password = (self.state / "etc" / "db_password").read_text()
            sql = ("CREATE DATABASE IF NOT EXISTS slurm_acct_db; "
                   f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
                   "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
            run_setup_step([find_binary("mariadb"), "--no-defaults", "-S", str(self.mariadb_socket), "-uroot", "-e", sql],
                        timeout=10)
            initialised.write_text("ok\n")

    def _ok(self, *args: str) -> bool:
        return self.client(*args, timeout=5).returncode == 0

    def _node_idle(self) -> bool:
        return self.client("sinfo", "-h", "-n", NODE, "-o", "%t", timeout=5).stdout.strip() == "idle"

    def _launch(self, name: str, cmd: list[str], ready: Callable[[], bool], deadline: float) -> None:
        """Start one daemon in the foreground, record it, poll ``ready`` until the overall deadline."""
        out = open(self.state / "log" / f"{name}.out", "ab")
        # A new session: the daemons outlive a `start` command line, and Ctrl-C in a shell does not reach them.
        proc = subprocess.Popen([find_binary(cmd[0]), *cmd[1:]], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        out.close()
        self._popens[name] = proc
        records = self._records()
        records[name] = {"pid": proc.pid, "start_time": process_start_time(proc.pid)}
        write_atomic(self._records_path(), json.dumps(records, indent=1))
        while True:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode} during start; "
                                   f"log tail:\n{self._log_tails(name)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready within {self.timeout_s:.0f} s of the cluster start; "
                                   f"log tail:\n{self._log_tails(name)}")
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(POLL_S)

    def _log_tails(self, name: str) -> str:
        paths = [self.state / "log" / f"{name}.out", self.log_path(name)]
        return "\n".join(f"  {p}:\n{log_tail(p)}" for p in paths if p.exists()) or "  (no log written)"

    # ------------------------------------------------------------------ stop
    def stop(self, timeout_s: float = 20.0) -> None:
        """Cancel all jobs, then stop only the recorded daemons (SIGTERM, SIGKILL after a deadline)."""
        records = self._records()
        if "slurmctld" in records and self._alive(records["slurmctld"]):
            self._drain_jobs(timeout_s / 2)
        for name in reversed(DAEMONS):
            if name in records:
                self._terminate(name, records[name], timeout_s / 2)
        self._kill_orphaned_job_processes()
        if self._records_path().exists():
            self._records_path().unlink()
        self._popens.clear()

    def _drain_jobs(self, timeout_s: float) -> None:
        """Jobs left running when slurmd stops would survive it (re-parented to PID 1)."""
        try:
            self.client("scancel", "-u", self.user, timeout=5)
            deadline = time.monotonic() + timeout_s
            while self.client("squeue", "-h", "-o", "%i", timeout=5).stdout.strip():
                if time.monotonic() > deadline:
                    return
                time.sleep(POLL_S * 2)
        except subprocess.TimeoutExpired:
            return

    def _terminate(self, name: str, record: dict, timeout_s: float) -> None:
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5)):
            if not self._alive(record):
                return
            try:
                os.kill(record["pid"], sig)
            except ProcessLookupError:
                return
            self._wait_gone(name, record, wait_s)

    def _wait_gone(self, name: str, record: dict, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._alive(record):
            proc = self._popens.get(name)
            if proc is not None and proc.pid == record["pid"]:
                try:
                    proc.wait(timeout=POLL_S)  # our child: reap it
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(POLL_S)
            if time.monotonic() > deadline:
                return

    def _kill_orphaned_job_processes(self) -> None:
        """After a forced stop, kill what this cluster's jobs left: slurmstepd and processes of its jobs.

        They carry this cluster's SLURM_CONF in their environment (inherited from slurmd or sbatch).
        """
        marker = f"SLURM_CONF={self.conf}".encode()
        for proc_dir in Path("/proc").glob("[0-9]*"):
            pid = int(proc_dir.name)
            if pid == os.getpid():
                continue
            try:
                environ = (proc_dir / "environ").read_bytes().split(b"\0")
                comm = (proc_dir / "comm").read_text().strip()
            except OSError:
                continue
            in_job = any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
            if marker in environ and (comm == "slurmstepd" or in_job):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, str]:
        """Daemon -> "running (pid N)" | "stopped", plus "node" -> the node state when slurmctld answers."""
        alive = self.running()
        report = {name: f"running (pid {alive[name]})" if name in alive else "stopped" for name in DAEMONS}
        if "slurmctld" in alive:
            try:
                report["node"] = self.client("sinfo", "-h", "-n", NODE, "-o", "%t", timeout=5).stdout.strip()
            except subprocess.TimeoutExpired:
                report["node"] = "no answer from slurmctld"
        return report

    def __enter__(self) -> "TestCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--state", required=True, help="private directory holding all the cluster's state")
    parser.add_argument("--ports", help="CTLD,SLURMD,DBD,MARIADB (default: free ones, kept across restarts)")
    parser.add_argument("--cpus", type=int, help="CPUs of the node (default: this host's)")
    parser.add_argument("--memory-mb", type=int, help="RealMemory of the node (default: this host's)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole start")
    args = parser.parse_args(argv)
    try:
        ports = Ports.parse(args.ports) if args.ports else None
        cluster = TestCluster(args.state, ports=ports, cpus=args.cpus, memory_mb=args.memory_mb,
                              timeout_s=args.timeout)
        if args.action == "start":
            began = time.monotonic()
            cluster.start()
            print(f"cluster up in {time.monotonic() - began:.1f} s; ports {asdict(cluster.ports)}")
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.action == "stop":
            cluster.stop()
            print(f"cluster in {cluster.state} stopped")
        else:
            report = cluster.status()
            for name, state in report.items():
                print(f"{name:10s} {state}")
            return 0 if all(report[name] != "stopped" for name in DAEMONS) else 1
    except (ClusterError, OSError) as err:
        print(f"testcluster {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
