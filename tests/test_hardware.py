"""The bf16 check: read from /proc/cpuinfo flags, warned about in the plan and in the job's log."""
from __future__ import annotations

import pytest

from experiments import run
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


def test_warning_only_for_bf16_on_an_emulating_cpu():
    warning = hardware.slow_bf16_warning("bf16", "cpu", ZEN1)
    assert "without native bf16" in warning and "solver.amp=none" in warning
    assert hardware.slow_bf16_warning("bf16", "cpu", SAPPHIRE_RAPIDS) is None
    assert hardware.slow_bf16_warning("none", "cpu", ZEN1) is None
    assert hardware.slow_bf16_warning("bf16", "cuda", ZEN1) is None
    assert hardware.slow_bf16_warning("bf16", "cpu", "") is None


def _job(digest, state, amp, device="auto"):
    return run.PlannedJob(digest, None, {"config": {"device": device, "solver": {"amp": amp}}}, [f"t/{digest}/seed0"],
                          [], {}, state, 0)


@pytest.mark.parametrize("native, executor, expected", [(False, "local", 2), (False, "slurm", 0), (True, "local", 0)])
def test_plan_note_counts_the_bf16_jobs_to_run_here(monkeypatch, native, executor, expected):
    monkeypatch.setattr(hardware, "native_bf16", lambda cpuinfo=None: native)
    planned = [_job("a", "new", "bf16"), _job("b", "partial", "bf16"), _job("c", "cached", "bf16"),
               _job("d", "new", "none"), _job("e", "new", "bf16", device="cuda")]
    note = run.bf16_note(planned, executor)
    if expected:
        assert note.startswith(f"warning: {expected} job(s) to run") and "without native bf16" in note
    else:
        assert note == ""


def test_job_log_warns_before_the_work_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "native_bf16", lambda cpuinfo=None: False)
    cfg = build_config("tiny", {"solver.amp": "bf16", "data.cache_dir": str(tmp_path / "cache")})

    def stop(*_):
        raise RuntimeError("stop after the setup")

    with pytest.raises(RuntimeError, match="stop after the setup"):
        train_and_evaluate(cfg, tmp_path / "run", build=stop)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "WARNING solver.amp=bf16 on a CPU without native bf16" in log
