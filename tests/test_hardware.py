"""The bf16 check: read from /proc/cpuinfo flags, said in the job's log (what it changes: test_cpu_bf16.py)."""
from __future__ import annotations

import pytest

from istr.config import build_config
from istr.engine import hardware
from istr.engine.job import train_and_evaluate

ZEN1 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_native_bf16_from_cpu_flags():
    assert hardware.cpu_flags(ZEN1) == frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
    assert hardware.native_bf16(ZEN1) is False
    assert hardware.native_bf16(SAPPHIRE_RAPIDS) is True
    assert hardware.native_bf16("flags\t: avx2 amx_bf16\n") is True
    assert hardware.native_bf16("processor\t: 0\n") is None  # no flags line: unknown, never warned about


def test_job_log_says_how_bf16_runs_before_the_work_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "native_bf16", lambda cpuinfo=None: False)
    cfg = build_config("tiny", {"solver.amp": "bf16", "data.cache_dir": str(tmp_path / "cache")})

    def stop(*_):
        raise RuntimeError("stop after the setup")

    with pytest.raises(RuntimeError, match="stop after the setup"):
        train_and_evaluate(cfg, tmp_path / "run", build=stop)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "INFO solver.amp=bf16 on a CPU without native bf16" in log and "computed in fp32" in log
