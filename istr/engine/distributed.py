"""Process-group setup from the launcher's environment, and the few collectives the engine needs.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; under SLURM
(``srun``) the same facts come from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first
host of ``SLURM_JOB_NODELIST``. One process per device; gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise RuntimeError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:  # expands compressed lists like node[1-4]
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodes.split(",")[0]


def env_info() -> DistInfo:
    """Rank facts from torchrun, else from a multi-task SLURM step, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(_env_int("RANK"), _env_int("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
        return DistInfo(_env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), int(os.environ.get("SLURM_LOCALID", "0")))
    return DistInfo()


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group when the environment describes one (idempotent); returns this rank's facts."""
    info = env_info()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size)
    return info


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of a dict of floats (same keys in the same order on every rank); identity in one process."""
    if not dist.is_initialized() or not values:
        return dict(values)
    keys = list(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist()))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable objects); ``[obj]`` in one process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
