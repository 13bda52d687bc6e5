"""Atomic files and training checkpoints.

Every file is written to a temporary name in its own directory and moved into place with
``os.replace``, so a crash (or ``kill -9``) leaves either the old file or the new one, never half of one.

A training checkpoint is a dict: ``model``, ``optimizer``, ``scheduler``, ``scaler`` (or None),
``iteration`` (iterations completed), ``rng`` (one entry per rank: python/numpy/torch/cuda states),
``config`` (``to_dict`` of the run's config, so a checkpoint alone can rebuild its model).
"""
from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

LAST = "last.pth"
FINAL = "final.pth"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message is one line naming the file."""


def _atomic_write(path: str | Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_write(path, lambda handle: torch.save(obj, handle), "wb")


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text), "w")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save`; CheckpointError (one line) if unreadable."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as err:  # torch raises many types for truncated / foreign files
        reason = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise CheckpointError(f"{path}: cannot read checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an ISTR checkpoint (no 'model' entry)")
    return ckpt


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM are ignored inside (main thread only): the save a stop makes must not be cut short by
    the next one (submitit's local controller, for one, sends SIGINT to its task again as it shuts down)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def buffer_snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of ``module``'s buffers. A training forward moves some of them (BatchNorm's running statistics), so a
    stop in the middle of an iteration restores the copies taken when the last one completed before saving."""
    return [b.detach().clone() for b in module.buffers()]


@torch.no_grad()
def restore_buffers(module: torch.nn.Module, snapshot: list[torch.Tensor]) -> None:
    for buffer, saved in zip(module.buffers(), snapshot):
        buffer.copy_(saved)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
