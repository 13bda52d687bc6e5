"""Training loop with a stand-in detector: schedule, data order, exact resume, NaN stop, atomic and
corrupt checkpoints, metrics.jsonl, profiling."""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal

import pytest
import torch

from engine_fakes import FakeDataset, FakeDetector
from istr.config import build_config
from istr.engine.checkpoint import LAST, CheckpointError, atomic_save, load_checkpoint
from istr.engine.sampling import IterationBatchSampler
from istr.engine.schedule import build_optimizer, lr_factor
from istr.engine.train import NonFiniteLossError, train

torch.set_num_threads(1)
LOG = logging.getLogger("test")


def tiny_cfg(**overrides):
    base = {"solver.batch_size": 4, "solver.max_iter": 6, "solver.checkpoint_period": 3, "solver.log_period": 1,
            "solver.lr": 1e-2, "solver.warmup_iters": 2, "solver.steps": [4], "data.num_workers": 0, "seed": 7}
    return build_config("tiny", {**base, **overrides})


def run(tmp, cfg, model=None, **kw):
    torch.manual_seed(0)
    model = model or FakeDetector()
    train(model, FakeDataset(10), cfg, tmp, torch.device("cpu"), LOG, **kw)
    return model


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lr_schedule_warmup_and_steps():
    s = tiny_cfg(**{"solver.warmup_iters": 4, "solver.warmup_factor": 0.01, "solver.steps": [6, 8], "solver.gamma": 0.1}).solver
    assert lr_factor(0, s) == pytest.approx(0.01)
    assert lr_factor(2, s) == pytest.approx(0.01 * 0.5 + 0.5)
    assert [lr_factor(i, s) for i in (4, 5, 6, 7, 8, 100)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_optimizer_choice():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    adamw = build_optimizer(model, tiny_cfg().solver)
    sgd = build_optimizer(model, tiny_cfg(**{"solver.optimizer": "sgd", "solver.momentum": 0.8, "solver.lr": 0.02}).solver)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["lr"] == 0.02
    assert sgd.param_groups[0]["weight_decay"] == tiny_cfg().solver.weight_decay


def test_backbone_lr_factor_applies_to_the_trunk_not_the_fpn():
    from istr.models.backbone import Backbone

    cfg = tiny_cfg(**{"solver.backbone_lr_factor": 0.125, "solver.lr": 1e-3})
    model = torch.nn.Module()
    model.backbone = Backbone(cfg.model.backbone)
    model.head = torch.nn.Linear(2, 2)
    head_group, trunk_group = build_optimizer(model, cfg.solver).param_groups
    assert trunk_group["lr"] == pytest.approx(1.25e-4) and head_group["lr"] == pytest.approx(1e-3)
    trunk = {id(p) for p in model.backbone.body.parameters() if p.requires_grad}
    assert {id(p) for p in trunk_group["params"]} == trunk
    assert {id(p) for p in model.backbone.fpn.parameters()} <= {id(p) for p in head_group["params"]}


def test_sampler_is_pure_sharded_and_covers_each_epoch():
    one = IterationBatchSampler(10, 4, seed=3)
    again = IterationBatchSampler(10, 4, seed=3, start_iter=2)
    assert one.batch_for(7) == again.batch_for(7)
    shards = [IterationBatchSampler(10, 4, seed=3, rank=r, world_size=2).batch_for(7) for r in range(2)]
    assert shards[0] + shards[1] == one.batch_for(7)
    first_epoch = [i for it in range(5) for i, _ in IterationBatchSampler(10, 4, seed=3).batch_for(it)][:10]
    assert sorted(first_epoch) == list(range(10))
    assert IterationBatchSampler(10, 4, seed=4).batch_for(0) != one.batch_for(0)
    with pytest.raises(ValueError, match="divisible"):
        IterationBatchSampler(10, 3, seed=0, world_size=2)


def test_resume_continues_exactly(tmp_path):
    full = run(tmp_path / "full", tiny_cfg())
    # an interrupted run: stop after the checkpoint at 3, then the same config again resumes to 6
    run(tmp_path / "split", tiny_cfg(**{"solver.max_iter": 3}))
    (tmp_path / "split" / "checkpoints" / "final.pth").unlink()
    resumed = run(tmp_path / "split", tiny_cfg())
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    lines = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5, 6]
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]  # noqa: E731
    assert untimed(read_jsonl(tmp_path / "split" / "metrics.jsonl")) == untimed(lines)
    assert lines[0]["lr"] == pytest.approx(1e-2 * 0.01) and lines[4]["lr"] == pytest.approx(1e-2 * 0.1)
    assert lines[0]["loss"] == pytest.approx(lines[0]["loss_l1_s1"] + lines[0]["loss_class_s1"])
    assert load_checkpoint(tmp_path / "full" / "checkpoints" / LAST)["iteration"] == 6
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["final.pth", "last.pth"]


class NaNAt(FakeDetector):
    """Its loss turns NaN at the ``bad``-th training call."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, images, targets=None, **kw):
        out = super().forward(images, targets, **kw)
        if self.training:
            self.calls += 1
            if self.calls == self.bad:
                out["loss_class_s1"] = out["loss_class_s1"] * float("nan")
        return out


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        run(tmp_path, tiny_cfg(), model=NaNAt(bad=5))
    message = str(err.value)
    assert "\n" not in message and "iteration 5" in message and "loss_class_s1=nan" in message
    ckpt = load_checkpoint(tmp_path / "checkpoints" / LAST)
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [LAST]  # no .tmp, no final


class StopAt(FakeDetector):
    """Raises ``stop`` (KeyboardInterrupt: Ctrl-C; SystemExit: SIGTERM as the entry points turn it) in the forward
    of its ``at``-th training call, i.e. in the middle of iteration ``at``, after a BatchNorm over the images has
    moved its running statistics."""

    def __init__(self, at=None, stop=KeyboardInterrupt):
        torch.manual_seed(0)
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(3)
        self.at, self.stop, self.calls = at, stop, 0

    def forward(self, images, targets=None, **kw):
        images = list(self.norm(torch.stack(images).float()) * 50 + 128)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise self.stop()
        return super().forward(images, targets, **kw)


def same_run(a, b, dir_a, dir_b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]  # noqa: E731
    assert untimed(read_jsonl(dir_b / "metrics.jsonl")) == untimed(read_jsonl(dir_a / "metrics.jsonl"))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stop_saves_the_last_completed_iteration_and_resumes_exactly(tmp_path, stop, caplog):
    full = run(tmp_path / "full", tiny_cfg(), model=StopAt())
    with pytest.raises(stop), caplog.at_level(logging.INFO, logger="test"):
        run(tmp_path / "stopped", tiny_cfg(), model=StopAt(at=5, stop=stop))
    # iteration 5 was under way: 4 are complete, one more than the periodic checkpoint at 3
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / LAST)["iteration"] == 4
    assert "stopped after iteration 4" in caplog.text
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == [LAST]
    resumed = run(tmp_path / "stopped", tiny_cfg(), model=StopAt())
    same_run(full, resumed, tmp_path / "full", tmp_path / "stopped")


def test_a_second_ctrl_c_does_not_cut_the_stop_save_short(tmp_path, monkeypatch):
    """submitit's local controller sends SIGINT again as it shuts down: the save of a stop ignores it."""
    import istr.engine.train as engine

    real_save, calls = engine.atomic_save, []

    def save_with_a_second_ctrl_c(obj, path):
        calls.append(obj["iteration"])
        if len(calls) == 2:  # the first is the periodic checkpoint at 3, the second the stop's at 4
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, path)

    monkeypatch.setattr(engine, "atomic_save", save_with_a_second_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_cfg(), model=StopAt(at=5))
    assert calls == [3, 4] and load_checkpoint(tmp_path / "checkpoints" / LAST)["iteration"] == 4
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_stop_inside_the_parameter_update_keeps_the_periodic_checkpoint(tmp_path, monkeypatch):
    import istr.engine.train as engine

    real_step = engine._optimizer_step

    def step_then_stop(optimizer, scaler, params, clip, iteration, values):
        real_step(optimizer, scaler, params, clip, iteration, values)
        if iteration + 1 == 5:  # parameters already moved, the lr step not taken: no consistent state to save
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_optimizer_step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", tiny_cfg(), model=StopAt())
    monkeypatch.setattr(engine, "_optimizer_step", real_step)
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / LAST)["iteration"] == 3
    same_run(run(tmp_path / "full", tiny_cfg(), model=StopAt()), run(tmp_path / "stopped", tiny_cfg(), model=StopAt()),
             tmp_path / "full", tmp_path / "stopped")


@pytest.mark.parametrize("eval_period, saved_at", [(2, 4), (3, 3)])
def test_a_stop_during_a_learning_curve_point_evaluates_it_on_resuming(tmp_path, eval_period, saved_at):
    """Checkpoints every 3 iterations. eval_period 2: stopped during the point at 4, the stop saves iteration 4;
    eval_period 3: stopped during the point at 3, the periodic checkpoint written just before it is the resume point.
    Either way the resumed run evaluates that point first and the curve equals an uninterrupted run's."""
    def curve_metrics(stop_at=None):
        calls = []

        def evaluate(model):
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return {"stages": {"1": {"mask_AP": float(sum(p.sum() for p in model.parameters()))}}}
        return evaluate

    cfg = tiny_cfg(**{"solver.eval_period": eval_period})
    full = run(tmp_path / "full", cfg, model=StopAt(), periodic_eval=curve_metrics())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", cfg, model=StopAt(), periodic_eval=curve_metrics(stop_at=2 if eval_period == 2 else 1))
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / LAST)["iteration"] == saved_at
    resumed = run(tmp_path / "stopped", cfg, model=StopAt(), periodic_eval=curve_metrics())
    same_run(full, resumed, tmp_path / "full", tmp_path / "stopped")
    points = lambda d: [(r["iteration"], r["stages"]) for r in read_jsonl(d / "learning_curve.jsonl")]  # noqa: E731
    assert points(tmp_path / "stopped") == points(tmp_path / "full")
    assert [i for i, _ in points(tmp_path / "full")] == list(range(eval_period, 7, eval_period))


def test_atomic_save_keeps_old_file_on_failure_and_corrupt_file_is_named(tmp_path):
    path = tmp_path / "ck.pth"
    atomic_save({"model": {"w": torch.ones(2)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("boom")

    with pytest.raises(pickle.PicklingError):
        atomic_save({"model": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / LAST).write_bytes(b"\x00garbage, not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        run(tmp_path / "run", tiny_cfg())
    assert str(err.value).startswith(str(tmp_path / "run" / "checkpoints" / LAST)) and "\n" not in str(err.value)
    assert "delete it to start this run over" in str(err.value)


def test_profile_prints_breakdown_and_writes_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="test"):
        run(tmp_path, tiny_cfg(), profile_iters=2)
    table = caplog.text
    for section in ("data", "backbone", "head", "matcher+losses", "backward", "optimizer", "over 2 iterations"):
        assert section in table, section
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_channels_last_training_matches_nchw_and_its_checkpoint_loads_anywhere(tmp_path):
    """solver.channels_last changes the memory layout only: the tiny ISTR's losses over 6 iterations agree
    with the NCHW run to 1e-4 relative (float rounding of reordered convolution sums)."""
    from istr.models import build_model

    def istr_run(name, channels_last):
        torch.manual_seed(0)
        cfg = tiny_cfg(**{"model.num_classes": 2, "solver.lr": 1e-3, "solver.channels_last": channels_last})
        model = build_model(cfg.model)
        return run(tmp_path / name, cfg, model=model)

    nchw, channels_last = istr_run("nchw", False), istr_run("cl", True)
    conv = channels_last.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    a, b = read_jsonl(tmp_path / "nchw" / "metrics.jsonl"), read_jsonl(tmp_path / "cl" / "metrics.jsonl")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert a[-1]["loss"] != pytest.approx(a[0]["loss"], rel=1e-3)  # the model did train
    reloaded = build_model(tiny_cfg(**{"model.num_classes": 2}).model)
    reloaded.load_state_dict(load_checkpoint(tmp_path / "cl" / "checkpoints" / LAST)["model"])
    # parameters are compared with the channels_last run itself: Adam's normalisation magnifies the 1e-7
    # gradient rounding differences of near-zero gradients, so they do not compare with the NCHW run's
    for (name, x), y in zip(channels_last.named_parameters(), reloaded.parameters()):
        assert torch.equal(x, y) and y.is_contiguous(), name
