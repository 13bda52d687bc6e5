"""Hashing, result directories, completeness, and jobs.execute's caching and re-running."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from istr.config import ADDED_KEYS, EVAL_PROTOCOL, build_config, to_dict
from experiments import jobs, store

REQUIRED = [("final", "mask_AP"), ("final", "box_AP")]


@pytest.fixture
def fake_runner(monkeypatch):
    """A runner that writes metrics computed from the config and counts its calls."""
    calls = []

    def run(cfg, output_dir):
        calls.append(str(output_dir))
        value = 10.0 + cfg.model.mask.components / 10
        store.write_json_atomic(output_dir / "metrics.json", {"final": {"mask_AP": value, "box_AP": value + 1},
                                                              "eval_protocol": EVAL_PROTOCOL})

    monkeypatch.setitem(jobs.RUNNERS, "istr", run)
    return calls


def spec(**overrides):
    return jobs.make_spec("istr", to_dict(build_config("tiny", overrides)))


def test_hash_is_stable_and_independent_of_key_order():
    a = {"runner": "istr", "config": {"seed": 1, "model": {"b": [1, 2], "a": 0.5}}}
    b = {"config": {"model": {"a": 0.5, "b": (1, 2)}, "seed": 1}, "runner": "istr"}
    assert store.spec_hash(a) == store.spec_hash(b) == "83ad4a6df99c"  # = sha256 of the sorted compact JSON; pinned: a change re-runs everything
    assert store.spec_hash({**a, "options": {}}) == store.spec_hash(a)  # empty options = no options
    assert len(store.spec_hash(spec())) == 12 and store.spec_hash(spec()) == store.spec_hash(spec())
    assert store.spec_hash(spec()) != store.spec_hash(spec(**{"model.mask.components": 20}))
    assert store.spec_hash(spec()) != store.spec_hash({**spec(), "options": {"runs": 3}})


def test_a_config_key_added_later_keeps_old_hashes_at_its_old_behaviour_value():
    new = spec()
    old = json.loads(json.dumps(new))
    for key in ADDED_KEYS:  # a spec written before these keys existed
        section, leaf = key.split(".")
        del old["config"][section][leaf]
    assert store.spec_hash(new) == store.spec_hash(old)
    assert store.spec_hash(spec(**{"solver.optimizer": "sgd"})) != store.spec_hash(old)
    assert store.spec_hash(spec(**{"solver.momentum": 0.5})) != store.spec_hash(old)


def test_atomic_write_and_corrupt_reads(tmp_path):
    store.write_json_atomic(tmp_path / "a" / "m.json", {"x": 1})
    assert store.read_json(tmp_path / "a" / "m.json") == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["m.json"]  # no temporary left behind
    (tmp_path / "a" / "m.json").write_text('{"x": ')
    assert store.read_json(tmp_path / "a" / "m.json") is None and store.read_json(tmp_path / "none.json") is None


@pytest.mark.parametrize("content,complete", [
    (None, False), ("{not json", False), ('{"final": {"mask_AP": 30.0}}', False),
    ('{"final": {"mask_AP": 30.0, "box_AP": null}}', False), ('[1, 2]', False),
    ('{"final": {"mask_AP": 30.0, "box_AP": -1}, "eval_protocol": %d}' % EVAL_PROTOCOL, True),
])
def test_completeness(tmp_path, content, complete):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    assert store.is_complete(tmp_path, REQUIRED) is complete


def test_execute_runs_once_then_is_cached(tmp_path, fake_runner):
    job = spec()
    directory = tmp_path / store.spec_hash(job)
    assert jobs.execute(job, directory, REQUIRED)["status"] == "done"
    assert jobs.execute(job, directory, REQUIRED)["status"] == "cached"
    assert len(fake_runner) == 1
    assert json.loads((directory / "spec.json").read_text()) == job
    assert (directory / "config.yaml").exists()
    run = json.loads((directory / "run.json").read_text())
    assert run["status"] == "done" and run["wall_s"] >= 0 and run["hash"] == directory.name


@pytest.mark.parametrize("damage", ['{"final": {"mask_AP": 1', '{"final": {"mask_AP": 16.0}}'])
def test_corrupt_or_partial_result_is_run_again(tmp_path, fake_runner, damage):
    job = spec()
    directory = tmp_path / store.spec_hash(job)
    jobs.execute(job, directory, REQUIRED)
    first = json.loads((directory / "run.json").read_text())
    (directory / "metrics.json").write_text(damage)
    assert jobs.execute(job, directory, REQUIRED)["status"] == "done"
    assert len(fake_runner) == 2 and store.is_complete(directory, REQUIRED)
    run = json.loads((directory / "run.json").read_text())  # the first attempt is kept in the record
    assert first.pop("attempts") == [] and run["attempts"] == [first] and run["status"] == "done"


def test_failing_or_incomplete_runner_is_recorded(tmp_path, monkeypatch):
    def crash(cfg, output_dir):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(jobs.RUNNERS, "istr", crash)
    with pytest.raises(RuntimeError):
        jobs.execute(spec(), tmp_path / "x", REQUIRED)
    run = json.loads((tmp_path / "x" / "run.json").read_text())
    assert run["status"] == "failed" and "out of memory" in run["error"]

    monkeypatch.setitem(jobs.RUNNERS, "istr", lambda cfg, out: store.write_json_atomic(out / "metrics.json", {"final": {}, "eval_protocol": EVAL_PROTOCOL}))
    with pytest.raises(jobs.JobError, match="missing final.mask_AP, final.box_AP"):
        jobs.execute(spec(), tmp_path / "y", REQUIRED)


def test_a_locked_directory_is_left_alone(tmp_path, fake_runner):
    directory = tmp_path / "z"
    with store.lock(directory):
        assert jobs.execute(spec(), directory, REQUIRED)["status"] == "busy"
    assert fake_runner == []


def test_options_reach_the_runner(tmp_path, monkeypatch):
    seen = {}

    def latency(cfg, output_dir, options):
        seen.update(options)
        store.write_json_atomic(output_dir / "metrics.json", {"fps": 2.0, "time_ms": 500.0})

    monkeypatch.setitem(jobs.RUNNERS, "latency", latency)
    job = jobs.make_spec("latency", to_dict(build_config("tiny")), {"runs": 3})
    assert jobs.execute(job, tmp_path / "l", [("fps",), ("time_ms",)])["status"] == "done"
    assert seen == {"runs": 3}


def test_a_detector_result_of_an_older_eval_protocol_is_incomplete(tmp_path):
    required = [("final", "mask_AP")]
    store.write_json_atomic(tmp_path / "metrics.json", {"final": {"mask_AP": 20.0}})  # before protocols existed
    assert not store.is_complete(tmp_path, required)
    assert store.missing_keys(store.read_metrics(tmp_path), required) == [
        f"eval_protocol={EVAL_PROTOCOL} (evaluated under 1)"]
    store.write_json_atomic(tmp_path / "metrics.json", {"final": {"mask_AP": 20.0}, "eval_protocol": EVAL_PROTOCOL})
    assert store.is_complete(tmp_path, required)
    store.write_json_atomic(tmp_path / "metrics.json", {"explained_variance_ratio": [1.0]})  # not a detector
    assert store.is_complete(tmp_path, [("explained_variance_ratio",)])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_tracked_results_root_keeps_text_records_and_ignores_checkpoints():
    """reports/results/<hash>/: git tracks the records a clone needs to know a job is done, never the weights."""
    root = Path(__file__).resolve().parents[1]
    tracked = ["spec.json", "config.yaml", "run.json", "metrics.json", "metrics.jsonl", "learning_curve.jsonl", "log.txt"]
    ignored = ["checkpoints/last.pth", "checkpoints/final.pth", "detections.json", ".lock"]
    paths = [f"reports/results/0123456789ab/{name}" for name in tracked + ignored] + ["reports/results/_submitit/1/a.out"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    assert sorted(out.stdout.split()) == sorted(paths[len(tracked):])


def test_missing_run_files_says_why_a_tool_cannot_read_a_run(tmp_path):
    assert store.missing_run_files(tmp_path / "absent", ["detections.json"]) == f"{tmp_path / 'absent'}: no such result directory"
    run = tmp_path / "run"
    run.mkdir()
    assert "(not a finished result directory)" in store.missing_run_files(run, ["config.yaml", "detections.json"])
    store.write_json_atomic(run / "metrics.json", {"final": {"mask_AP": 1.0}})  # finished; big files elsewhere
    problem = store.missing_run_files(run, ["config.yaml", "detections.json"])
    assert problem.startswith(f"{run}: no config.yaml, detections.json: the job is finished") and "\n" not in problem
    (run / "config.yaml").write_text("{}")
    (run / "detections.json").write_text("[]")
    assert store.missing_run_files(run, ["config.yaml", "detections.json"]) is None


def test_config_differences_name_the_keys_that_differ_between_runs(tmp_path):
    for name, text in (("a", "seed: 1\nmodel: {head: {proposal_init: grid, steps: [1, 2]}, name: x}\n"),
                       ("b", "seed: 2\nmodel: {head: {proposal_init: image, steps: [1, 2]}, name: x}\n"),
                       ("c", "seed: 1\nmodel: {head: {proposal_init: grid, steps: [1, 3]}}\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(text)
    runs = [tmp_path / n for n in "abc"]
    assert store.config_differences(runs) == [
        "model.head.proposal_init=grid, model.head.steps=[1, 2], model.name=x, seed=1",
        "model.head.proposal_init=image, model.head.steps=[1, 2], model.name=x, seed=2",
        "model.head.proposal_init=grid, model.head.steps=[1, 3], model.name=unset, seed=1"]
    assert store.config_differences(runs[:1]) == [""]
    assert store.config_differences([runs[0], runs[0]]) == ["", ""]
