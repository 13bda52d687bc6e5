"""The command lines end to end at tiny scale (real model and data, subprocesses): kill -9 then resume gives
the run an uninterrupted one gives; a custom COCO-format dataset by path; evaluate CLI; bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from istr.config import EVAL_PROTOCOL

REPO = Path(__file__).resolve().parents[1]
TINY = ["--scale", "tiny", "num_threads=1"]


def cli(module, *args, cache=None, check=True, **kw):
    cmd = [sys.executable, "-m", module, *args] + ([f"data.cache_dir={cache}"] if cache else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a, weights_only=False)["model"], torch.load(b, weights_only=False)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa if isinstance(wa[k], torch.Tensor))


RESUMABLE = [*TINY, "solver.max_iter=9", "solver.checkpoint_period=3", "solver.steps=[6]"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache) -> Path:
    """An uninterrupted 9-iteration tiny run without a learning curve."""
    out = tmp_path_factory.mktemp("full")
    cli("istr.train", "--output-dir", str(out), *RESUMABLE, cache=cache)
    return out


def test_learning_curve_points_change_no_training_numerics(tmp_path, cache, full_run):
    run = tmp_path / "curve"
    cli("istr.train", "--output-dir", str(run), *RESUMABLE, "solver.eval_period=3", "solver.eval_images=8",
        cache=cache)
    points = [json.loads(line) for line in (run / "learning_curve.jsonl").read_text().splitlines()]
    assert [p["iteration"] for p in points] == [3, 6, 9]
    assert all(set(p["stages"]) == {"1", "2"} and "mask_AP" in p["stages"]["2"] for p in points)
    assert [p["train_time_s"] for p in points] == sorted(p["train_time_s"] for p in points)
    final = json.loads((run / "metrics.json").read_text())
    assert final["num_val_images"] == 8 and points[-1]["stages"] == final["stages"]  # same model, same images
    assert final["stages"] == json.loads((full_run / "metrics.json").read_text())["stages"]
    assert same_weights(run / "checkpoints" / "final.pth", full_run / "checkpoints" / "final.pth")


def test_kill9_then_same_command_resumes_to_the_same_result(tmp_path, cache, full_run):
    args = RESUMABLE

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "istr.train", "--output-dir", str(run), *args, f"data.cache_dir={cache}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    assert not list((run / "checkpoints").glob("*.tmp"))
    killed_at = torch.load(run / "checkpoints" / "last.pth", weights_only=False)["iteration"]
    assert killed_at < 9

    out = cli("istr.train", "--output-dir", str(run), *args, cache=cache)
    assert f"resumed from {run / 'checkpoints' / 'last.pth'} at iteration {killed_at}" in out.stdout
    full, resumed = (json.loads((d / "metrics.json").read_text()) for d in (full_run, run))
    assert resumed["stages"] == full["stages"] and resumed["iterations"] == full["iterations"] == 9
    assert (run / "detections.json").read_text() == (full_run / "detections.json").read_text()
    assert same_weights(run / "checkpoints" / "final.pth", full_run / "checkpoints" / "final.pth")
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (full_run, run)]
    assert len(losses[0]) == 9 and losses[0] == losses[1]
    assert not list((run / "checkpoints").glob("*.tmp"))
    # a finished run is not redone
    again = cli("istr.train", "--output-dir", str(run), *args, cache=cache)
    assert "is complete" in again.stdout and json.loads((run / "metrics.json").read_text()) == resumed


def test_sigterm_saves_where_the_run_stopped_and_the_same_command_resumes_it(tmp_path, cache, full_run):
    run = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "istr.train", "--output-dir", str(run), *RESUMABLE, f"data.cache_dir={cache}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logged = lambda: len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").exists() else 0  # noqa: E731
    deadline = time.time() + 240
    while logged() < 4 and proc.poll() is None and time.time() < deadline:  # past the periodic checkpoint at 3
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped; the same command resumes the run" in stderr
    assert not (run / "metrics.json").exists(), "the run finished before it could be stopped"
    stopped_at = torch.load(run / "checkpoints" / "last.pth", weights_only=False)["iteration"]
    # the last completed iteration; the periodic checkpoint at 3 only when the signal landed inside a parameter
    # update (tests/test_engine_train.py covers each case without a race)
    assert stopped_at < 9 and (stopped_at >= logged() or stopped_at == 3), (stopped_at, logged())
    assert not list((run / "checkpoints").glob("*.tmp"))

    out = cli("istr.train", "--output-dir", str(run), *RESUMABLE, cache=cache)
    assert f"at iteration {stopped_at}" in out.stdout
    full, resumed = (json.loads((d / "metrics.json").read_text()) for d in (full_run, run))
    assert resumed["stages"] == full["stages"]
    assert same_weights(run / "checkpoints" / "final.pth", full_run / "checkpoints" / "final.pth")


def test_result_of_an_older_eval_protocol_is_evaluated_again_not_retrained(tmp_path, cache, full_run):
    run = tmp_path / "stale"
    shutil.copytree(full_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_protocol"] == EVAL_PROTOCOL
    (run / "metrics.json").write_text(json.dumps({**metrics, "eval_protocol": EVAL_PROTOCOL - 1,
                                                  "final": {"mask_AP": -1.0}}))
    jsonl = (run / "metrics.jsonl").read_text()
    out = cli("istr.train", "--output-dir", str(run), *RESUMABLE, cache=cache)
    assert "is complete" not in out.stdout and "at iteration 9" in out.stdout  # resumed at the end: no training
    again = json.loads((run / "metrics.json").read_text())
    assert again["eval_protocol"] == EVAL_PROTOCOL and again["stages"] == metrics["stages"]
    assert again["train_time_s"] == metrics["train_time_s"] and (run / "metrics.jsonl").read_text() == jsonl


def write_custom_dataset(root: Path) -> None:
    """COCO-format directory: 56x40 images (not the synthetic size), categories 3, 9, 12 (not the synthetic ones)."""
    rng = np.random.default_rng(0)
    cats = [{"id": 3, "name": "bar"}, {"id": 9, "name": "block"}, {"id": 12, "name": "dot"}]
    for split, n in (("train", 10), ("val", 3)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            canvas = rng.integers(0, 60, (40, 56, 3), dtype=np.uint8)
            for k, cat in enumerate(rng.choice([3, 9, 12], size=2)):
                x, y = int(rng.integers(0, 30)), int(rng.integers(0, 20))
                w, h = int(rng.integers(8, 24)), int(rng.integers(8, 18))
                canvas[y:y + h, x:x + w] = [200, 40 * k, 10 * int(cat)]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cat), "iscrowd": 0,
                             "bbox": [x, y, w, h], "area": float(w * h),
                             "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            Image.fromarray(canvas).save(root / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": 56, "height": 40})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_custom_dataset_by_path_trains_and_evaluates(tmp_path, cache):
    data = tmp_path / "mydata"
    write_custom_dataset(data)
    run = tmp_path / "run"
    cli("istr.train", "--output-dir", str(run), *TINY, f"data.dataset={data}", "solver.max_iter=2", cache=cache)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_val_images"] == 3 and list(metrics["stages"]) == ["1", "2"]
    assert len(metrics["final"]) == 24 and metrics["final"] == metrics["stages"]["2"]
    detections = json.loads((run / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {3, 9, 12}
    assert all(len(d["bbox"]) == 4 and "counts" in d["segmentation"] for d in detections)

    # the evaluate CLI on the same data from the checkpoint alone reproduces the job's evaluation
    out = tmp_path / "eval"
    cli("istr.evaluate", "--checkpoint", str(run / "checkpoints" / "final.pth"),
        "--data", str(data / "annotations" / "instances_val.json"), "--images", str(data / "val"), "--output-dir", str(out))
    assert json.loads((out / "metrics.json").read_text())["stages"] == metrics["stages"]
    assert (out / "detections.json").read_text() == (run / "detections.json").read_text()


def test_bad_input_one_line_exit_2(tmp_path, cache):
    for args in (["--output-dir", str(tmp_path / "a"), *TINY, "solver.max_itr=3"],
                 ["--output-dir", str(tmp_path / "b"), *TINY, f"data.dataset={tmp_path / 'nowhere'}"]):
        proc = cli("istr.train", *args, cache=cache, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = cli("istr.evaluate", "--checkpoint", str(bad), "--data", str(tmp_path), check=False)
    assert proc.returncode == 2 and str(bad) in proc.stderr and proc.stderr.count("\n") == 1
    assert "start this run over" not in proc.stderr  # resume advice belongs to training, not to evaluation
    for module in ("istr.train", "istr.evaluate"):
        assert "key=value" in cli(module, "--help").stdout


def test_nan_loss_exits_nonzero_with_one_line(tmp_path, cache):
    proc = cli("istr.train", "--output-dir", str(tmp_path), *TINY, "solver.lr=1e30", "solver.clip_grad_norm=0",
               cache=cache, check=False)
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(error) == 1 and "non-finite" in error[0] and "iteration" in error[0], proc.stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists()
