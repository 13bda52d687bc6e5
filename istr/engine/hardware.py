"""The CPU's model name and whether it runs bf16 natively, read from /proc/cpuinfo (no torch import: run.json's
provenance uses it too). Where it does not, bf16 autocast computes its products in fp32 (istr/engine/cpu_bf16.py).
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Optional

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> Optional[str]:
    """/proc/cpuinfo, read once per process (None where it does not exist)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_model() -> str:
    """"AMD EPYC", "Intel(R) Xeon(R) Processor", ...: the first ``model name`` of /proc/cpuinfo."""
    for line in (_proc_cpuinfo() or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags(cpuinfo: Optional[str] = None) -> Optional[frozenset[str]]:
    """The first processor's ``flags`` from /proc/cpuinfo text (read when not given); None when unknown."""
    for line in ((_proc_cpuinfo() if cpuinfo is None else cpuinfo) or "").splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def native_bf16(cpuinfo: Optional[str] = None) -> Optional[bool]:
    """True with AVX512-BF16 or AMX-BF16, False without, None when the flags cannot be read (not Linux)."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else any(f in flags for f in NATIVE_BF16_FLAGS)

