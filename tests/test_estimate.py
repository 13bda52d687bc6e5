"""``experiments.run NAME --estimate``: timed iterations scaled by each job's schedule, one measurement per
distinct config, resumed jobs counted from their checkpoint, an uncached trunk pretraining counted once."""
from __future__ import annotations

import pytest
import torch

from experiments import estimate, run
from experiments.estimate import JobEstimate


def test_a_job_estimate_adds_training_curve_points_and_the_final_evaluation():
    e = JobEstimate("h", "t/v/seed0", step_s=2.0, iterations=3000, eval_points=12, eval_images=100, val_images=200,
                    eval_s_per_image=0.5, eval_fixed_s=3.0)
    assert e.training_s == 6000.0
    assert e.evaluation_s == pytest.approx(0.5 * (12 * 100 + 200) + 3.0 * 13)
    assert e.total_s == pytest.approx(6000.0 + 739.0)
    text = estimate.format_estimate({"jobs": [e, e], "pretraining_s": 1200.0, "not_estimated": ["fig1/PCA/seed0"],
                                     "device": "cpu", "threads": 2}, executor="local")
    assert "3000 it x 2.00 s = 1 h 40 min" in text and "-> 1 h 53 min" in text
    assert "trunk pretraining (not cached; once, shared by the jobs): 20 min" in text
    assert "fig1/PCA/seed0: not estimated" in text
    assert text.splitlines()[-1] == "total: 4 h 05 min for 2 job(s) one after another"  # 2 x 6739 s + 1200 s
    on_slurm = estimate.format_estimate({"jobs": [e, e], "pretraining_s": 1200.0, "not_estimated": [],
                                         "device": "cpu", "threads": 2}, executor="slurm")
    assert on_slurm.splitlines()[-1].startswith("total: 2 h 13 min with the jobs side by side")


def test_duration_rounds_up_to_minutes():
    assert [estimate.duration(s) for s in (40, 61, 3600, 3601, 7260)] == ["40 s", "2 min", "1 h 00 min", "1 h 01 min",
                                                                        "2 h 01 min"]


def test_estimate_measures_each_distinct_config_once_and_counts_what_a_job_has_left(tmp_path):
    root = tmp_path / "results"
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "solver.eval_period=2", "solver.eval_images=3",
                 "pretrain.enabled=true", "pretrain.max_iter=40", "pretrain.batch_size=4"]
    planned = run.plan(["table1a"], "tiny", root, seeds=2, only=["l=40", "l=60"], overrides=overrides)
    assert len(planned) == 4 and all(j.state == "new" for j in planned)
    resumed = planned[1]  # l=40, second seed: 4 of its 6 iterations done
    (resumed.directory / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "iteration": 4}, resumed.directory / "checkpoints" / "last.pth")
    planned[2].state = "cached"  # l=60, first seed

    lines = []
    result = estimate.estimate(planned, log=lines.append)
    assert lines.count("measuring the trunk pretraining ...") == 1  # one trunk for every job
    assert len([line for line in lines if line.startswith("measuring table1a")]) == 2  # l=40 and l=60, not per seed
    by_use = {e.use: e for e in result["jobs"]}
    assert set(by_use) == {"table1a/l=40/seed0", "table1a/l=40/seed1", "table1a/l=60/seed1"}
    fresh, partial = by_use["table1a/l=40/seed0"], by_use["table1a/l=40/seed1"]
    assert (fresh.iterations, fresh.eval_points, fresh.eval_images, fresh.val_images) == (6, 3, 3, 8)
    assert (partial.iterations, partial.eval_points) == (2, 1)  # curve points at 2 and 4 are done, 6 is to come
    assert fresh.step_s == partial.step_s > 0 and fresh.eval_s_per_image > 0
    assert result["pretraining_s"] > 0
    text = estimate.format_estimate(result, "local")
    assert f"{fresh.digest}  table1a/l=40/seed0: 6 it x" in text and "total:" in text.splitlines()[-1]
