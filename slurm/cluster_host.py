"""Host-side pieces of the loopback SLURM test cluster (slurm/testcluster.py): binaries, ports, process
identity, setup commands, atomic files. No daemon is managed here."""
from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # start order; stop is the reverse
REQUIRED_BINARIES = DAEMONS + ("mungekey", "munge", "unmunge", "mariadb-install-db", "mariadb", "mariadb-admin",
                               "sacctmgr", "scontrol", "sinfo", "squeue", "scancel", "sbatch", "sacct", "srun")
PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, so outgoing connections do not take them


class ClusterError(RuntimeError):
    """The cluster cannot start or stop; the message names the daemon and ends with its log tail."""


@dataclass(frozen=True)
class Ports:
    slurmctld: int
    slurmd: int
    slurmdbd: int
    mariadb: int

    @classmethod
    def parse(cls, text: str) -> "Ports":
        """``"CTLD,SLURMD,DBD,MARIADB"`` -> Ports."""
        parts = text.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() and 0 < int(p) < 65536 for p in parts):
            raise ClusterError(f"--ports '{text}': expected four port numbers CTLD,SLURMD,DBD,MARIADB")
        ports = cls(*(int(p) for p in parts))
        if len(set(asdict(ports).values())) != 4:
            raise ClusterError(f"--ports '{text}': the four ports must differ")
        return ports


def find_binary(name: str) -> Optional[str]:
    """Daemons live in /usr/sbin, which is not on every user's PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [name for name in REQUIRED_BINARIES if find_binary(name) is None]


def host_memory_mb() -> int:
    """MemTotal in MB, as ``slurmd -C`` reports it."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("cannot read MemTotal from /proc/meminfo")


def port_is_free(port: int) -> bool:
    """True if a daemon could listen on ``port`` (the SLURM daemons bind every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons do: TIME_WAIT is no clash
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_free_ports() -> Ports:
    rng = random.Random(secrets.randbits(64))
    chosen: list[int] = []
    while len(chosen) < 4:
        port = rng.randrange(*PORT_RANGE)
        if port not in chosen and port_is_free(port):
            chosen.append(port)
    return Ports(*chosen)


def process_start_time(pid: int) -> Optional[str]:
    """Kernel start time of ``pid`` (field 22 of /proc/PID/stat), None if gone or a zombie.

    Recorded with each PID so that ``stop`` never signals a recycled PID.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in "ZX" else fields[19]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"    ({path} does not exist)"
    return "\n".join("    " + line for line in text[-lines:]) or f"    ({path} is empty)"


def run_setup_step(cmd: list[str], timeout: float) -> None:
    """Run a one-off setup command; failure -> ClusterError with its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mariadb-install-db is a script: kill what it started too
        proc.wait()
        raise ClusterError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise ClusterError(f"{Path(cmd[0]).name} failed with code {proc.returncode}: {output.strip()[-2000:]}")


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
