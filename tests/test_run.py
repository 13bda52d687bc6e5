"""The runner CLI: planning (shared default job), dry run, caching, bad input, executors."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import jobs, launch, run, store
from istr.config import EVAL_PROTOCOL

REPO = Path(__file__).resolve().parents[1]
FINAL = ["mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl",
         "box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm", "box_APl"]


@pytest.fixture
def fake_runners(monkeypatch):
    """Every runner replaced by one that writes metrics computed from the config; calls are counted."""
    calls = []

    def fake(cfg, output_dir, options=None):
        calls.append(cfg.seed)
        base = 20 + cfg.model.mask.components / 100 + (cfg.seed % 3)
        final = {m: base + i for i, m in enumerate(FINAL)}
        stages = {str(k): {m: v - 1 + k / cfg.model.head.num_stages for m, v in final.items()} for k in range(1, cfg.model.head.num_stages + 1)}
        store.write_json_atomic(output_dir / "metrics.json", {"final": final, "stages": stages, "fps": 2.0, "time_ms": 500.0,
                                                              "eval_protocol": EVAL_PROTOCOL,
                                                              "explained_variance_ratio": [1 / 784] * 784})

    for name in jobs.RUNNERS:
        monkeypatch.setitem(jobs.RUNNERS, name, fake)
    return calls


def test_default_model_is_planned_once_for_all_of_table1(tmp_path):
    names = ["table1a", "table1b", "table1c", "table1d", "table1e", "fig3"]
    planned = run.plan(names, "smoke", tmp_path)
    shared = [j for j in planned if "table1a/l=60/seed0" in j.uses]
    assert len(shared) == 1 and len(shared[0].uses) == 6
    assert len(planned) == 4 + 3 + 2 + 1 + 3 + 3  # 13 non-default variants + 3 seeds of the default
    assert {j.state for j in planned} == {"new"}
    assert ("stages", "6", "box_AP") in shared[0].required and ("final", "mask_AP") in shared[0].required


HEAVY_LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "pandas", "matplotlib", "pycocotools", "submitit")


def test_dry_run_lists_the_plan_imports_no_heavy_library_and_writes_nothing(tmp_path):
    """What keeps the dry run under its 2 s (benchmarks/test_run.py times it): the plan needs none of the heavy
    libraries, whose imports alone take seconds. A fresh interpreter, as a user's command gets."""
    env = {**os.environ, "ISTR_RESULTS": str(tmp_path / "results")}
    code = ("import sys\nfrom experiments import run\n"
            f"code = run.main(['all', '--dry-run', '--reports-dir', {str(tmp_path / 'r')!r}])\n"
            f"print('loaded:', sorted(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules))\nsys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout
    assert "plan: 24 job(s) at scale 'smoke', 0 cached, 24 to run" in out.stdout
    assert "table1a/l=60/seed0, table1b/cosine/seed0" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_list_shows_entries_and_reported_rows(capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "table1e: " in out and "avg+pos" in out and "SOLOv2 R101" in out and "reported only" in out


def test_run_report_then_everything_cached(tmp_path, fake_runners, capsys):
    args = ["table1c", "--scale", "tiny", "--executor", "debug", "--results-root", str(tmp_path / "res"),
            "--reports-dir", str(tmp_path / "rep"), "--seeds", "2", "model.head.num_proposals=8"]
    assert run.main(args) == 0
    out = capsys.readouterr().out
    assert "[6/6]" in out and "overall 6/6 finished, 0 failed" in out
    assert len(fake_runners) == 6 and (tmp_path / "rep" / "table1c-tiny.md").exists()
    assert run.main(args) == 0
    assert len(fake_runners) == 6  # nothing ran again
    assert "6 cached, 0 to run" in capsys.readouterr().out


def test_a_result_of_an_older_eval_protocol_is_planned_stale_and_run_again(tmp_path, fake_runners, capsys):
    args = ["table1c", "--scale", "tiny", "--executor", "debug", "--results-root", str(tmp_path), "--reports-dir",
            str(tmp_path / "rep"), "--seeds", "1", "--only", "dice"]
    assert run.main(args) == 0 and len(fake_runners) == 1
    (job,) = [j for j in run.plan(["table1c"], "tiny", tmp_path, seeds=1) if j.state == "cached"]
    metrics = json.loads((job.directory / "metrics.json").read_text())
    store.write_json_atomic(job.directory / "metrics.json", {**metrics, "eval_protocol": EVAL_PROTOCOL - 1})
    capsys.readouterr()
    assert run.main([*args, "--dry-run"]) == 0
    assert f"{job.digest}  stale" in capsys.readouterr().out
    assert run.main(args) == 0 and len(fake_runners) == 2
    assert json.loads((job.directory / "metrics.json").read_text())["eval_protocol"] == EVAL_PROTOCOL


def test_only_runs_the_named_variants(tmp_path, fake_runners):
    args = ["table1a", "--scale", "tiny", "--executor", "debug", "--results-root", str(tmp_path), "--reports-dir",
            str(tmp_path / "rep"), "--only", "l=40", "mask", "model.head.num_proposals=8"]
    assert run.main(args) == 0
    assert len(fake_runners) == 2
    spec_configs = [store.read_json(p)["config"] for p in tmp_path.glob("*/spec.json")]
    assert sorted(c["model"]["mask"]["representation"] for c in spec_configs) == ["pca", "raw"]
    assert {c["model"]["head"]["num_proposals"] for c in spec_configs} == {8}


@pytest.mark.parametrize("args,message", [
    (["table9"], "unknown experiment 'table9'; choose one of table1a"),
    (["table9"], "latency, all"),  # `all` is a name for the runner only
    (["table1a", "--only", "l=50"], "unknown variant 'l=50' for table1a; choose one of"),
    (["table1a", "model.mask.componets=40"], "unknown config key 'model.mask.componets'; did you mean model.mask.components"),
    (["table1a", "model.mask.components=forty"], "model.mask.components: expected an integer, got 'forty'"),
    (["table1a", "model.head.interaction=conv"], "choose one of 'dynamic', 'multihead'"),
    (["table1a", "--scale", "huge"], "unknown scale 'huge'; choose one of tiny, smoke, paper"),
    (["table1a", "--executor", "cloud"], "unknown executor 'cloud'; choose one of debug, local"),
])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, capsys, fake_runners, args, message):
    code = run.main(args + ["--results-root", str(tmp_path / "res"), "--reports-dir", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == [] and fake_runners == []


def test_failed_job_gives_exit_1_and_the_others_still_run(tmp_path, fake_runners, monkeypatch, capsys):
    good = jobs.RUNNERS["istr"]

    def flaky(cfg, output_dir, options=None):
        if cfg.model.loss.mask_loss == "dice":
            raise RuntimeError("diverged")
        good(cfg, output_dir)

    monkeypatch.setitem(jobs.RUNNERS, "istr", flaky)
    code = run.main(["table1c", "--scale", "tiny", "--executor", "debug", "--results-root", str(tmp_path),
                     "--reports-dir", str(tmp_path / "rep")])
    assert code == 1 and len(fake_runners) == 2
    assert "failed" in capsys.readouterr().out


def test_local_executor_runs_tasks_in_subprocesses(tmp_path):
    target = tmp_path / "out.json"
    tasks = [launch.Task("k1", "write", store.write_json_atomic, (str(target), {"ok": 1}), {"time_min": 1}),
             launch.Task("k2", "bad", store.write_json_atomic, (str(tmp_path / "no" / "x.json"), {1j}), {"time_min": 1})]
    events = []
    outcomes = launch.make_executor("local", tmp_path / "submitit", max_parallel=2).run(
        tasks, lambda task, event, outcome: events.append((task.key, event)))
    assert outcomes["k1"].status == "done" and outcomes["k2"].status == "failed" and "TypeError" in outcomes["k2"].error
    assert store.read_json(target) == {"ok": 1}
    assert len(list((tmp_path / "submitit").glob("*/*_log.out"))) == 2  # each ran as a submitit job
    assert sorted(events) == [("k1", "end"), ("k1", "start"), ("k2", "end"), ("k2", "start")]


def test_local_executor_reports_running_jobs_on_a_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.LocalExecutor, "heartbeat_s", 0.3)
    events = []
    task = launch.Task("k", "slow", time.sleep, (2.0,), {"time_min": 1})
    launch.make_executor("local", tmp_path / "submitit", max_parallel=1).run(
        [task], lambda task, event, outcome: events.append(event))
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("running") >= 2  # ~2 s of work at a 0.3 s heartbeat


def test_training_progress_reads_the_last_logged_iteration(tmp_path):
    job = run.PlannedJob("h", tmp_path, {"config": {"solver": {"max_iter": 3000}}}, ["t/x/seed0"], [], {}, "", 0)
    assert run.training_progress(job) == ""  # nothing logged yet
    lines = [{"iteration": i, "time_s": 0.9, "loss": 1.0} for i in (20, 40, 1200)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run.training_progress(job) == "iteration 1200/3000, 0.90 s/it, ~27 min of training to go"


def test_sigterm_stops_the_run_and_records_the_attempt(tmp_path, fake_runners, monkeypatch, capsys):
    """kill (SIGTERM) mid-job: exit 143, the attempt is kept as stopped with its wall time (--status says so), the
    next run redoes it."""
    good = jobs.RUNNERS["istr"]

    def killed(cfg, output_dir, options=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    monkeypatch.setitem(jobs.RUNNERS, "istr", killed)
    handler = signal.getsignal(signal.SIGTERM)
    args = ["table1c", "--scale", "tiny", "--executor", "debug", "--results-root", str(tmp_path / "res"),
            "--reports-dir", str(tmp_path / "rep"), "--seeds", "1", "--only", "dice"]
    with pytest.raises(SystemExit) as stop:
        run.main(args)
    assert stop.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is handler
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "res").glob("*/run.json")]
    assert record["status"] == "stopped" and 0 < record["wall_s"] < 5 and "SystemExit" in record["error"]
    assert not (tmp_path / "rep").exists()
    capsys.readouterr()
    assert run.main([*args, "--status"]) == 0
    assert re.search(r"INCOMPLETE +table1c/dice/seed0  run.json: stopped$", capsys.readouterr().out, re.M)

    monkeypatch.setitem(jobs.RUNNERS, "istr", good)
    assert run.main(args) == 0
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "res").glob("*/run.json")]
    assert record["status"] == "done" and [a["status"] for a in record["attempts"]] == ["stopped"]


def test_real_data_jobs_without_backbone_weights_are_warned_about():
    def job(digest, state, weights=None, pretrain=False, dataset="coco"):
        config = {"model": {"backbone": {"weights": weights}}, "pretrain": {"enabled": pretrain}, "data": {"dataset": dataset}}
        return run.PlannedJob(digest, None, {"config": config}, [f"t/{digest}/seed0"], [], {}, state, 0)

    planned = [job("a", "new"), job("b", "partial"), job("c", "cached"), job("d", "new", weights="/w/r50.pth"),
               job("e", "new", pretrain=True)]
    assert run.random_init_note(planned).startswith("warning: 2 job(s) to run train on a real dataset from a randomly "
                                                    "initialised ResNet")
    assert run.random_init_note([job("d", "new", weights="/w/r50.pth"), job("e", "new", pretrain=True)]) == ""
    assert run.random_init_note([job("f", "new", dataset="synthetic")]) == ""  # the scale no longer gates it: the data does
