"""experiments.check: exit 0 (pass), 1 (regression), 2 (missing / incomplete / no baseline)."""
import json

import pytest

from experiments import check, registry, store
from istr.config import EVAL_PROTOCOL
from result_fixtures import FINAL, put_result


def put(root, name, label, scale, seed, values):
    return put_result(root, name, label, scale, seed, {"final": values})


def values(offset):
    return {m: 20.0 + offset + i for i, m in enumerate(FINAL)}


@pytest.fixture
def smoke_results(tmp_path):
    """table1d at smoke scale: 3 seeds of the default (spread 0.5), one of multi-head."""
    dirs = {f"dynamic/{s}": put(tmp_path / "res", "table1d", "dynamic", "smoke", s, values(o)) for s, o in enumerate([0.0, 0.5, -0.5])}
    dirs["multi-head/0"] = put(tmp_path / "res", "table1d", "multi-head", "smoke", 0, values(-5.0))
    return tmp_path, dirs


def run_check(tmp_path, *extra, scale="smoke"):
    return check.main(["table1d", "--scale", scale, "--results-root", str(tmp_path / "res"),
                       "--baselines-dir", str(tmp_path / "baselines"), *extra])


def test_smoke_check_pass_regression_missing(smoke_results, capsys):
    tmp_path, dirs = smoke_results
    assert run_check(tmp_path) == 2  # no baseline yet: never a pass
    assert "MISSING baseline" in capsys.readouterr().out
    assert run_check(tmp_path, "--update-baseline") == 0
    baseline = json.loads((tmp_path / "baselines" / "table1d.json").read_text())
    cell = baseline["cells"]["dynamic"]["mask_AP"]
    assert cell["value"] == pytest.approx(20.0) and cell["seeds"] == 3
    assert cell["tolerance"] == pytest.approx(3 * 0.5)  # std_factor 3 x pooled std 0.5 beats the 1.0 AP floor
    assert baseline["cells"]["multi-head"]["box_AP75"]["tolerance"] == pytest.approx(1.5)

    assert run_check(tmp_path) == 0
    out = capsys.readouterr().out
    assert "PASS table1d | multi-head | mask_AP: ours 15.000, expected 15.000 ± 1.500" in out
    assert "12 cells: 12 pass, 0 fail, 0 missing" in out

    store.write_json_atomic(dirs["multi-head/0"] / "metrics.json", {"final": values(-3.0), "eval_protocol": EVAL_PROTOCOL})  # +2 AP: beyond 1.5
    assert run_check(tmp_path) == 1
    assert "FAIL table1d | multi-head | mask_AP: ours 17.000, expected 15.000 ± 1.500 (delta +2.000)" in capsys.readouterr().out

    (dirs["multi-head/0"] / "metrics.json").write_text('{"final": {"mask_AP": 15.0')  # corrupt = incomplete
    assert run_check(tmp_path) == 2
    assert "MISSING table1d | multi-head | mask_AP: no complete result" in capsys.readouterr().out


def test_a_row_missing_from_the_smoke_baseline_is_never_a_pass(tmp_path, capsys):
    """A baseline written while only the default had run must not let the other variants pass unchecked."""
    put(tmp_path / "res", "table1d", "dynamic", "smoke", 0, values(0.0))
    assert run_check(tmp_path, "--seeds", "1", "--update-baseline") == 0
    assert run_check(tmp_path, "--seeds", "1") == 2
    out = capsys.readouterr().out
    assert "PASS table1d | dynamic | mask_AP" in out
    assert "MISSING table1d | multi-head: not in the baseline" in out
    assert "6 cells: 6 pass, 0 fail, 0 missing; 1 row(s) not in the baseline" in out


def test_paper_scale_compares_with_the_paper(tmp_path, capsys):
    paper = registry.get("table1d").reference
    for label in ("multi-head", "dynamic"):
        put(tmp_path / "res", "table1d", label, "paper", 0, {m: paper.loc[label, m] + 0.4 for m in paper.columns} | {m: 0.0 for m in FINAL if m not in paper.columns})
    assert run_check(tmp_path, scale="paper") == 0
    assert "PASS table1d | dynamic | mask_AP: ours 34.600, expected 34.200 ± 1.000" in capsys.readouterr().out
    put(tmp_path / "res", "table1d", "dynamic", "paper", 0, {m: paper.loc["dynamic", m] - 1.5 for m in paper.columns})
    assert run_check(tmp_path, scale="paper") == 1
    directory = put(tmp_path / "res", "table1d", "multi-head", "paper", 0, {})
    (directory / "metrics.json").unlink()
    assert run_check(tmp_path, scale="paper") == 2  # missing takes precedence over a failure


def test_bad_name_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert check.main(["table7", "--results-root", str(tmp_path), "--baselines-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown experiment 'table7'; choose one of table1a" in err and not err.rstrip().endswith(", all")
    assert list(tmp_path.iterdir()) == []


def test_a_baseline_written_from_other_jobs_is_stale(smoke_results, capsys):
    """After a preset change no current job is among the baseline's runs: exit 2, not a pass or a 'regression'."""
    tmp_path, _ = smoke_results
    assert run_check(tmp_path, "--update-baseline") == 0
    path = tmp_path / "baselines" / "table1d.json"
    baseline = json.loads(path.read_text())
    assert len(baseline["runs"]) == 4
    assert run_check(tmp_path, "--seeds", "1") == 0  # a subset of the baseline's jobs is still comparable
    baseline["runs"] = ["0123456789ab", "ba9876543210"]  # as if written under another preset
    path.write_text(json.dumps(baseline))
    capsys.readouterr()
    assert run_check(tmp_path) == 2
    out = capsys.readouterr().out
    assert out.startswith("STALE baseline: ") and "0123456789ab, ba9876543210" in out and "PASS" not in out
    assert run_check(tmp_path, "--changed-config") == 0  # the user accepts that the jobs differ: compared cell by cell
    out = capsys.readouterr().out
    assert "12 cells: 12 pass" in out and "NOTE --changed-config" in out


def test_nothing_complete_points_at_the_results_root(tmp_path, capsys):
    put(tmp_path / "res", "table1d", "dynamic", "smoke", 0, values(0.0))
    assert run_check(tmp_path, "--seeds", "1", "--update-baseline") == 0
    assert check.main(["table1d", "--seeds", "1", "--results-root", str(tmp_path / "empty"),
                       "--baselines-dir", str(tmp_path / "baselines")]) == 2
    out = capsys.readouterr().out
    assert "6 cells: 0 pass, 0 fail, 6 missing" in out
    assert f"NOTE none of table1d's jobs is complete under {tmp_path / 'empty'}" in out


def test_paper_scale_check_names_the_entry_deviations(tmp_path, capsys):
    assert check.main(["table2", "--scale", "paper", "--results-root", str(tmp_path)]) == 2  # nothing measured
    out = capsys.readouterr().out
    assert "NOTE split: ours is evaluated on COCO val2017" in out and "test-dev" in out
