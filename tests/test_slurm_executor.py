"""``--executor slurm`` (experiments/slurm_executor.py, slurm_job.py) against the real local cluster.

Fast tests use a fake runner (a few seconds of sleep); the table1a tests at the end train for real.
Every wait has a deadline: a lost job must fail the test, never hang it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from istr.config import EVAL_PROTOCOL, ConfigError

from experiments import slurm_executor
from experiments.launch import Task

pytestmark = pytest.mark.slurm
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs unpickle the fake runners by value
TINY = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "time_min": 10, "partition": None}


# ---------------------------------------------------------------------------------------------- fake runners
def fake_runner(output_dir: str, steps: int, step_s: float) -> dict:
    """Counts steps into output_dir/progress, resuming where a previous run of the job stopped."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs", "a") as runs:
        runs.write(f"{os.environ.get('SLURM_JOB_ID')} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
    progress = out / "progress"
    done = int(progress.read_text()) if progress.exists() else 0
    for step in range(done, steps):
        time.sleep(step_s)
        progress.write_text(str(step + 1))
    return {"status": "done", "wall_s": steps * step_s}


def failing_runner() -> dict:
    raise ValueError("runner broke on purpose")


def distributed_probe() -> dict:
    """What a multi-task job's tasks see: the torchrun variables, and a gloo all_reduce over them."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    total = torch.tensor([float(os.environ["RANK"]) + 1])
    dist.all_reduce(total)
    dist.destroy_process_group()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {"env": {k: os.environ.get(k) for k in keys}, "sum": total.item()}


def tasks_for(tmp_path: Path, labels, steps: int = 2, step_s: float = 1.0, table: str = "fake") -> list[Task]:
    return [Task(f"k{label}", f"{table}/{label}/seed0", fake_runner, (str(tmp_path / f"r{label}"), steps, step_s),
                 dict(TINY)) for label in labels]


def wait_until_ended(job_ids, timeout_s: float = 60) -> None:
    """Poll sacct until none of ``job_ids`` is pending or running (the accounting lags the job's own exit)."""
    deadline = time.monotonic() + timeout_s
    while set(slurm_executor.slurm_states(job_ids).values()) & set(slurm_executor.ACTIVE_STATES):
        assert time.monotonic() < deadline, f"jobs {job_ids} still active after {timeout_s} s"
        time.sleep(0.5)


def run_with_deadline(executor, tasks, timeout_s: float = 120):
    """``executor.run`` in a thread with a deadline; returns (outcomes, progress events)."""
    events, result = [], {}
    thread = threading.Thread(target=lambda: result.update(executor.run(tasks, lambda t, e, o: events.append(
        (t.key, e, o.status if o else None)))), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"executor.run still waiting after {timeout_s} s"
    return result, events


def sacct_rows(cluster, job_id: str, *flags: str) -> list[str]:
    return cluster.client("sacct", "-n", "-P", "-X", *flags, "-o", "JobID,State", "-j", job_id).stdout.split()


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)
    return value


# ---------------------------------------------------------------------------------------------- settings, no cluster
def args_for(**kw) -> argparse.Namespace:
    base = dict(executor="slurm", scale="paper", slurm=[], sbatch=[], slurm_config=None, slurm_folder=None)
    return argparse.Namespace(**{**base, **kw})


def test_settings_precedence_registry_user_file_command_line(tmp_path, monkeypatch):
    user = tmp_path / "slurm.yaml"
    user.write_text("partition: batch\naccount: proj\nsbatch: {mail-type: END}\n"
                    "scales:\n  paper: {partition: gpu, time_min: 4320}\n  tiny: {partition: debug}\n")
    options = slurm_executor.options_from_args(args_for(slurm_config=str(user), slurm=["qos=high", "nodes=2"],
                                                        sbatch=["exclusive", "comment=istr"]))
    executor = slurm_executor.SlurmExecutor(tmp_path / "default", None, **options)
    registry = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 8, "mem_gb": 64, "time_min": 2880, "partition": None}
    params = slurm_executor.submitit_parameters(executor.resources(Task("k", "table1a/l=60/seed0", print, (), registry)))
    assert params == {"nodes": 2, "ntasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 8, "mem": "64GB",
                      "time": 4320, "partition": "gpu", "account": "proj", "qos": "high",
                      "additional_parameters": {"mail-type": "END", "exclusive": True, "comment": "istr"}}
    assert slurm_executor.submitit_parameters({"mem_gb": 1.5})["mem"] == "1536MB"

    monkeypatch.setenv("HOME", str(tmp_path))  # the default user file is ~/.config/istr/slurm.yaml
    assert slurm_executor.options_from_args(args_for())["settings"] == {"sbatch": {}}
    (tmp_path / ".config" / "istr").mkdir(parents=True)
    (tmp_path / ".config" / "istr" / "slurm.yaml").write_text("account: mine\n")
    assert slurm_executor.options_from_args(args_for())["settings"]["account"] == "mine"


def test_folder_from_flag_then_environment_then_results_root(tmp_path, monkeypatch):
    monkeypatch.delenv(slurm_executor.FOLDER_ENV, raising=False)
    assert slurm_executor.job_folder(None, tmp_path / "res" / "_submitit") == tmp_path / "res" / "_submitit"
    monkeypatch.setenv(slurm_executor.FOLDER_ENV, str(tmp_path / "env"))
    assert slurm_executor.job_folder(None, tmp_path / "x") == tmp_path / "env"
    assert slurm_executor.job_folder(str(tmp_path / "flag"), tmp_path / "x") == tmp_path / "flag"


@pytest.mark.parametrize("content, kw, message", [
    ("partitoin: gpu\n", {}, "{file}: unknown SLURM setting 'partitoin'; choose one of nodes, "),
    ("nodes: many\n", {}, "{file}: SLURM setting 'nodes' must be int, got 'many'"),
    ("scales: {paper: {qos: [1]}}\n", {}, "{file} scales.paper: SLURM setting 'qos' must be str"),
    ("- a\n", {}, "{file}: expected a mapping of SLURM settings"),
    ("", {"slurm": ["partition"]}, "--slurm partition: expected KEY=VALUE"),
    ("", {"slurm": ["gpus=2"]}, "--slurm: unknown SLURM setting 'gpus'"),
    ("", {"executor": "local", "slurm": ["partition=gpu"]}, "apply to --executor slurm only"),
])
def test_bad_settings_are_one_line_errors(tmp_path, content, kw, message):
    user = tmp_path / "slurm.yaml"
    user.write_text(content)
    with pytest.raises(ConfigError) as err:
        slurm_executor.options_from_args(args_for(slurm_config=str(user), **kw))
    assert message.format(file=user) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--slurm-config /no/such.yaml: no such file"):
        slurm_executor.options_from_args(args_for(slurm_config="/no/such.yaml"))


def test_pending_array_rows_are_expanded():
    assert slurm_executor._expand_array_id("7_[0-2,5%2]") == ["7_0", "7_1", "7_2", "7_5"]
    assert slurm_executor._expand_array_id("7_3") == ["7_3"] and slurm_executor._expand_array_id("8") == ["8"]


def test_rank_above_zero_trains_without_the_books(tmp_path, monkeypatch):
    """In a multi-task job every rank calls jobs.execute: rank 0 holds the lock, the others train beside it."""
    from experiments import jobs, store

    calls = []
    monkeypatch.setitem(jobs.RUNNERS, "fake", lambda cfg, out: calls.append(Path(out)))
    spec = {"runner": "fake", "config": {}}
    with store.lock(tmp_path).acquire(timeout=0):  # rank 0 is running the job
        assert jobs.execute(spec, tmp_path)["status"] == "busy" and calls == []
        monkeypatch.setenv("RANK", "1")
        assert jobs.execute(spec, tmp_path)["status"] == "done" and calls == [tmp_path]
    assert not (tmp_path / "run.json").exists()
    store.write_json_atomic(tmp_path / "metrics.json", {"final": {"mask_AP": 1.0}, "eval_protocol": EVAL_PROTOCOL})
    assert jobs.execute(spec, tmp_path, [("final", "mask_AP")])["status"] == "cached" and len(calls) == 1


# ---------------------------------------------------------------------------------------------- against the cluster
def test_one_array_per_table_completes_with_records_and_status(slurm_env, tmp_path, capsys):
    executor = slurm_executor.SlurmExecutor(tmp_path / "submitit", max_parallel=2)
    tasks = tasks_for(tmp_path, "abc") + tasks_for(tmp_path, "d", table="other")
    outcomes, events = run_with_deadline(executor, tasks)
    assert {k: o.status for k, o in outcomes.items()} == {"ka": "done", "kb": "done", "kc": "done", "kd": "done"}
    assert sorted(e[1] for e in events) == ["end"] * 4 + ["start"] * 4
    records = {t.key: json.loads((tmp_path / "submitit" / "jobs" / f"{t.key}.json").read_text()) for t in tasks}
    arrays = {r["job_id"].split("_")[0] for r in records.values()}
    assert len(arrays) == 2  # one array per table
    assert sorted(records[k]["job_id"].split("_")[1] for k in ("ka", "kb", "kc")) == ["0", "1", "2"]
    assert all(Path(r["stdout"]).is_file() and str(tmp_path / "submitit") in r["stdout"] for r in records.values())
    printed = capsys.readouterr().out
    assert f"submitted fake: SLURM array {records['ka']['job_id'].split('_')[0]} (3 task(s), 2 limit at once)" in printed
    assert all(r["job_id"] in printed and r["stdout"] in printed for r in records.values())
    assert all((tmp_path / f"r{label}" / "progress").read_text() == "2" for label in "abcd")

    # submitit sees the result file a moment before slurmd reports the step ended: wait for sacct to settle.
    wait_until_ended([r["job_id"] for r in records.values()])
    planned = [argparse.Namespace(digest=t.key, uses=[t.name], state="partial") for t in tasks]
    planned.append(argparse.Namespace(digest="never", uses=["fake/e/seed0"], state="new"))
    slurm_executor.print_status(planned, tmp_path / "submitit")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [[t.key, "COMPLETED"] for t in tasks] + [["never", "NOT"]]
    assert f"job {records['kd']['job_id']}  log {records['kd']['stdout']}" in lines[3]


def test_failing_runner_is_a_failed_outcome(slurm_env, tmp_path):
    executor = slurm_executor.SlurmExecutor(tmp_path / "submitit")
    outcomes, _ = run_with_deadline(executor, [Task("kf", "fake/f/seed0", failing_runner, (), dict(TINY))], 60)
    assert outcomes["kf"].status == "failed"
    assert re.fullmatch(r"SLURM job \d+( FAILED)?: .*ValueError: runner broke on purpose", outcomes["kf"].error)
    assert "runner broke on purpose" in Path(
        json.loads((tmp_path / "submitit" / "jobs" / "kf.json").read_text())["stderr"]).read_text()


@pytest.mark.parametrize("setting, reason", [
    ({"partition": "nosuchpart"}, "Invalid partition name specified"),
    ({"mem_gb": 10_000}, "Requested node configuration is not available"),
    ({"cpus_per_task": 64}, "More processors requested than permitted"),
])
def test_refused_array_fails_fast_with_slurms_reason(slurm_env, tmp_path, setting, reason):
    executor = slurm_executor.SlurmExecutor(tmp_path / "submitit", settings=setting)
    began = time.monotonic()
    with pytest.raises(ConfigError, match=f"SLURM refused the fake array: .*{reason}"):
        executor.run(tasks_for(tmp_path, "a"), lambda *a: None)
    assert time.monotonic() - began < 10
    assert not (tmp_path / "submitit" / "jobs").exists()


def test_next_run_attaches_to_queued_jobs_instead_of_resubmitting(slurm_env, tmp_path, capsys):
    first = slurm_executor.SlurmExecutor(tmp_path / "submitit")
    tasks = tasks_for(tmp_path, "ab", steps=3)
    jobs = first._submit_array("fake", tasks, False)  # a run interrupted right after submitting
    ids = sorted(job.job_id for job in jobs)
    outcomes, _ = run_with_deadline(slurm_executor.SlurmExecutor(tmp_path / "submitit"), tasks)
    assert {o.status for o in outcomes.values()} == {"done"}
    assert capsys.readouterr().out.count("attached to SLURM job") == 2
    array = ids[0].split("_")[0]
    # nothing submitted twice; sacct may show the array as one row for a moment after it ends
    wait_until(lambda: sorted(r.split("|")[0] for r in sacct_rows(slurm_env, array)) == ids, 30, "sacct rows of the array")
    assert all((tmp_path / f"r{label}" / "runs").read_text().count("\n") == 1 for label in "ab")


def test_scontrol_requeue_reruns_and_the_runner_resumes(slurm_env, tmp_path):
    executor = slurm_executor.SlurmExecutor(tmp_path / "submitit")
    task = tasks_for(tmp_path, "q", steps=16, step_s=1.0)[0]
    progress = tmp_path / "rq" / "progress"
    result = {}
    thread = threading.Thread(target=lambda: result.update(executor.run([task], lambda *a: None)), daemon=True)
    thread.start()
    wait_until(lambda: progress.exists() and int(progress.read_text()) >= 4, 60, "first run reaching step 4")
    job_id = json.loads((tmp_path / "submitit" / "jobs" / "kq.json").read_text())["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    stopped_at = int(progress.read_text())
    thread.join(150)
    assert not thread.is_alive(), "requeued job did not finish within 150 s"
    assert result["kq"].status == "done" and progress.read_text() == "16"
    runs = (tmp_path / "rq" / "runs").read_text().splitlines()
    assert runs == [f"{job_id} restart=0", f"{job_id} restart=1"]
    assert stopped_at < 16


def test_cancelled_tasks_fail_while_the_others_finish(slurm_env, tmp_path, monkeypatch):
    """Task 0 cancelled while running (CANCELLED in sacct), task 3 while pending (it vanishes from SLURM)."""
    monkeypatch.setattr(slurm_executor, "VANISHED_AFTER_S", 5)
    executor = slurm_executor.SlurmExecutor(tmp_path / "submitit", max_parallel=1)
    tasks = tasks_for(tmp_path, "w", steps=30) + tasks_for(tmp_path, "xyz", steps=2)
    result = {}
    thread = threading.Thread(target=lambda: result.update(executor.run(tasks, lambda *a: None)), daemon=True)
    thread.start()
    records = tmp_path / "submitit" / "jobs"
    wait_until(lambda: (tmp_path / "rw" / "progress").exists(), 60, "task 0 running")
    array = json.loads((records / "kw.json").read_text())["job_id"].split("_")[0]
    subprocess.run(["scancel", f"{array}_0", f"{array}_3"], check=True, timeout=30)
    thread.join(120)
    assert not thread.is_alive(), "executor did not finish within 120 s after the cancellations"
    assert {k: o.status for k, o in result.items()} == {"kw": "failed", "kx": "done", "ky": "done", "kz": "failed"}
    assert "vanished before it ran" in result["kz"].error
    assert int((tmp_path / "rw" / "progress").read_text()) < 30 and not (tmp_path / "rz").exists()


def test_multi_task_job_exports_torchrun_variables(slurm_env, tmp_path):
    import submitit

    from experiments.slurm_job import ResumableCall

    executor = submitit.SlurmExecutor(folder=tmp_path / "%j")
    executor.update_parameters(ntasks_per_node=2, cpus_per_task=1, mem="2GB", time=5)
    job = executor.submit(ResumableCall(distributed_probe))
    wait_until(lambda: job.done(force_check=True), 120, "two-task job")
    results = job.results()
    assert [r["env"]["RANK"] for r in results] == ["0", "1"]
    assert {r["env"]["WORLD_SIZE"] for r in results} == {"2"} and [r["env"]["LOCAL_RANK"] for r in results] == ["0", "1"]
    assert len({(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in results}) == 1
    assert [r["sum"] for r in results] == [3.0, 3.0]


# ---------------------------------------------------------------------------------------------- table1a, real training
REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)
    return done


def metrics_by_hash(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/metrics.json")}


def comparable(metrics: dict) -> dict:
    """Everything but the timings."""
    return {k: v for k, v in metrics.items() if not k.endswith("_time_s")}


def test_table1a_array_equals_local_and_a_cancelled_variant_is_rerun_alone(slurm_env, tmp_path):
    local, slurm, folder = tmp_path / "local", tmp_path / "slurm", tmp_path / "submitit"
    common = ("table1a", "--scale", "tiny", "--reports-dir", str(tmp_path / "reports"))
    began = time.monotonic()
    done = cli("run", *common, "--executor", "local", "--results-root", str(local))
    assert done.returncode == 0, done.stdout + done.stderr
    local_s = time.monotonic() - began

    began = time.monotonic()
    run = subprocess.Popen([sys.executable, "-m", "experiments.run", *common, "--executor", "slurm", "--max-parallel",
                            "2", "--results-root", str(slurm), "--slurm-folder", str(folder)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        records = wait_until(lambda: sorted(folder.glob("jobs/*.json")) if len(list(folder.glob("jobs/*.json"))) == 5
                             else None, 60, "a record per variant")
        last = max((json.loads(p.read_text()) for p in records), key=lambda r: int(r["job_id"].split("_")[1]))
        subprocess.run(["scancel", last["job_id"]], check=True, timeout=30)  # pending: 2 tasks run at once
        output, _ = run.communicate(timeout=300)
    finally:
        run.kill()
    slurm_s = time.monotonic() - began
    assert run.returncode == 1, output
    # Cancelled while pending: CANCELLED in sacct, or (before SLURM split the array record) no trace at all.
    assert re.search(f"SLURM job {last['job_id']} (CANCELLED|vanished before it ran)", output), output
    assert "overall 5/5 finished, 1 failed" in output
    missing_label = last["name"].split("/")[1]

    status = cli("run", *common, "--status", "--results-root", str(slurm), "--slurm-folder", str(folder))
    assert status.returncode == 0
    assert status.stdout.count("COMPLETE ") == 4 and f"job {last['job_id']}" in status.stdout

    baselines = tmp_path / "baselines"
    assert cli("check", "table1a", "--scale", "tiny", "--results-root", str(local), "--baselines-dir",
               str(baselines), "--update-baseline").returncode == 0
    check = cli("check", "table1a", "--scale", "tiny", "--results-root", str(slurm), "--baselines-dir", str(baselines))
    assert check.returncode == 2, check.stdout + check.stderr
    assert {line.split(" | ")[1] for line in check.stdout.splitlines() if line.startswith("MISSING")} == {missing_label}

    again = cli("run", *common, "--executor", "slurm", "--results-root", str(slurm), "--slurm-folder", str(folder))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "plan: 5 job(s) at scale 'tiny', 4 cached, 1 to run" in again.stdout
    assert "(1 task(s)" in again.stdout and f"table1a/{missing_label}/seed0" in again.stdout
    ours, theirs = metrics_by_hash(slurm), metrics_by_hash(local)
    assert sorted(ours) == sorted(theirs) and len(ours) == 5
    assert all(comparable(ours[h]) == comparable(theirs[h]) for h in ours)
    print(f"table1a tiny: local {local_s:.1f} s, slurm array (with one cancelled task) {slurm_s:.1f} s")


def test_requeued_training_resumes_from_its_checkpoint_with_the_same_metrics(slurm_env, tmp_path):
    # long enough (~0.2 s an iteration on a quiet machine) that the requeue lands mid-run
    args = ("table1a", "--scale", "tiny", "--only", "l=60", "solver.max_iter=150", "solver.checkpoint_period=5",
            "--reports-dir", str(tmp_path / "reports"))
    root, folder = tmp_path / "slurm", tmp_path / "submitit"
    run = subprocess.Popen([sys.executable, "-m", "experiments.run", *args, "--executor", "slurm", "--results-root",
                            str(root), "--slurm-folder", str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        def checkpointed_at_10():
            logs = list(root.glob("*/log.txt"))
            return logs and "iter 12/150" in logs[0].read_text() and logs[0]

        log = wait_until(checkpointed_at_10, 120, "training past its iteration-10 checkpoint")
        record = json.loads(next(folder.glob("jobs/*.json")).read_text())
        subprocess.run(["scontrol", "requeue", record["job_id"]], check=True, timeout=30)
        output, _ = run.communicate(timeout=240)
    finally:
        run.kill()
    assert run.returncode == 0, output
    resumed = re.findall(r"resumed from \S+ at iteration (\d+)", log.read_text())
    assert len(resumed) == 1 and 10 <= int(resumed[0]) < 150, log.read_text()
    assert Path(record["stdout"]).read_text().count("Starting with JobEnvironment") == 2

    reference = tmp_path / "reference"
    done = cli("run", *args, "--executor", "debug", "--results-root", str(reference))
    assert done.returncode == 0, done.stdout + done.stderr
    ours, theirs = metrics_by_hash(root), metrics_by_hash(reference)
    assert sorted(ours) == sorted(theirs) and len(ours) == 1
    assert all(comparable(ours[h]) == comparable(theirs[h]) for h in ours)
