"""The CPU's model name and whether it runs bf16 natively, read from /proc/cpuinfo (no torch import: the planner
and run.json's provenance use it too).

Without AVX512-BF16 or AMX, ``torch.autocast("cpu", torch.bfloat16)`` still runs but converts in software:
on a 2-core AMD EPYC (Zen 1, AVX2 only) one smoke training step took 31.6 s in bf16 against 2.6 s in fp32
(``python -m istr.train --scale smoke --profile 6``, 2026-12-06), while the Xeon with AMX the smoke preset was
tuned on ran it 1.4x faster in bf16 than in fp32 (reports/smoke_probes.md).
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


def slow_bf16_warning(amp: str, device_type: str, cpuinfo: Optional[str] = None) -> Optional[str]:
    """One line for a bf16 run on a CPU that emulates bf16 (None when the run is not one)."""
    if amp != "bf16" or device_type != "cpu" or native_bf16(cpuinfo) is not False:
        return None
    return ("solver.amp=bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): torch emulates "
            "it, ~12x slower than fp32 (measured per smoke step on an AVX2-only EPYC); solver.amp=none trains in fp32 "
            "instead (another config hash, so not the committed bf16 results)")
