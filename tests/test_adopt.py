"""Adopting an istr.train run as a registry job: only the exact job is accepted, and then it counts as cached."""
import json
import shutil

import pytest

from experiments import adopt, registry, run, store
from istr.config import ConfigError
from istr.engine.job import train_and_evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of table1a's default (l=60) made directly with the engine, as `python -m istr.train` would."""
    tmp = tmp_path_factory.mktemp("adopt")
    overrides = [f"data.cache_dir={tmp / 'cache'}"]
    cfg = registry.get("table1a").resolve("l=60", "tiny", overrides)
    train_and_evaluate(cfg, tmp / "run")
    return tmp, overrides


def test_adopted_run_is_the_cached_job_with_its_origin_recorded(trained, capsys):
    tmp, overrides = trained
    root = tmp / "results"
    target = adopt.adopt(tmp / "run", "table1a", "l=60", "tiny", 0, overrides, root, commit="abc123")
    digest = store.spec_hash(json.loads((target / "spec.json").read_text()))
    assert target.name == digest
    record = json.loads((target / "run.json").read_text())
    metrics = json.loads((target / "metrics.json").read_text())
    assert record["status"] == "done" and record["git_commit"] == "abc123"
    assert record["adopted_from"] == str((tmp / "run").resolve())
    assert record["wall_s"] == pytest.approx(metrics["train_time_s"] + metrics["eval_time_s"])
    assert not [p for p in root.iterdir() if p.name.startswith(".adopt-")]  # no staging left behind
    # the runner now sees the job as done: nothing to run
    assert run.main(["table1a", "--scale", "tiny", "--seeds", "1", "--only", "l=60", "--results-root", str(root),
                     "--dry-run", *overrides]) == 0
    assert f"{digest}  cached" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exists"):
        adopt.adopt(tmp / "run", "table1a", "l=60", "tiny", 0, overrides, root)


def test_another_jobs_run_or_an_incomplete_run_is_refused(trained, tmp_path, capsys):
    tmp, overrides = trained
    root = tmp_path / "results"
    with pytest.raises(ConfigError, match=r"config differs in model\.mask\.components"):
        adopt.adopt(tmp / "run", "table1a", "l=40", "tiny", 0, overrides, root)
    with pytest.raises(ConfigError, match="config differs in seed"):
        adopt.adopt(tmp / "run", "table1a", "l=60", "tiny", 1, overrides, root)
    partial = tmp_path / "partial"
    shutil.copytree(tmp / "run", partial)
    (partial / "metrics.json").unlink()
    assert adopt.main([str(partial), "table1a", "l=60", "--scale", "tiny", "--results-root", str(root), *overrides]) == 2
    assert "incomplete run, missing metrics.json" in capsys.readouterr().err
    assert adopt.main([str(tmp_path / "nothing"), "table1a", "l=60", "--scale", "tiny", "--results-root", str(root)]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err
    assert not root.exists() or not any(root.iterdir())  # nothing written
