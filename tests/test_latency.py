"""The latency protocol (istr.engine.latency) and the latency runner (baselines.latency)."""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from istr.engine.latency import LatencyCase, PartTimer, describe_environment, measure_latency


class Sleeper(nn.Module):
    def __init__(self, seconds: float, log: list, name: str):
        super().__init__()
        self.seconds, self.log, self.name = seconds, log, name

    def forward(self, x):
        self.log.append((self.name, torch.is_inference_mode_enabled(), self.training))
        time.sleep(self.seconds)
        return x


class ToyDetector(nn.Module):
    """backbone 20 ms, head 10 ms, a post-processing method 5 ms."""

    def __init__(self, log: list, name: str):
        super().__init__()
        self.backbone, self.head, self.log, self.name = Sleeper(0.02, log, name), Sleeper(0.01, log, name), log, name

    def postprocess(self, x):
        time.sleep(0.005)
        return [{"n": x.shape[-1]}]

    def forward(self, images):
        return self.postprocess(self.head(self.backbone(images[0])))


PARTS = {"backbone": "backbone", "head": "head", "post": "postprocess"}


def test_parts_medians_and_protocol():
    log: list = []
    a, b = ToyDetector(log, "A"), ToyDetector(log, "B")
    b.train()
    cases = [LatencyCase("A", a, PARTS, lambda out: {"detections": float(out[0]["n"])}), LatencyCase("B", b, PARTS)]
    images = [torch.zeros(3, 4, 5), torch.zeros(3, 4, 7)]
    results = measure_latency(cases, images, warmup=1, runs=4)
    for name in ("A", "B"):
        s = results[name].summary()
        assert s["runs"] == 4
        assert s["parts_ms"]["backbone"] == pytest.approx(20, abs=8)
        assert s["parts_ms"]["head"] == pytest.approx(10, abs=8)
        assert s["parts_ms"]["post"] == pytest.approx(5, abs=8)
        assert 0 <= s["parts_ms"]["other"] < 5
        assert s["time_ms"] >= 35 and s["fps"] == pytest.approx(1e3 / s["time_ms"])
        assert s["q1_ms"] <= s["time_ms"] <= s["q3_ms"]
    assert results["A"].summary()["detections"] == pytest.approx(6.0)  # images of width 5 and 7 alternate
    assert all(inference and not training for _, inference, training in log)  # eval + inference_mode
    order = [name for name, *_ in log[::2]]  # one entry per call (backbone)
    assert order == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A"]  # warm-up, then ABBA rounds
    assert "postprocess" not in vars(a) and not a.backbone._forward_hooks  # timing hooks removed


def test_bad_arguments_fail_clearly():
    model = ToyDetector([], "A")
    with pytest.raises(ValueError, match="runs >= 1"):
        measure_latency([LatencyCase("A", model)], [torch.zeros(3, 2, 2)], runs=0)
    timer = PartTimer(model, {"neck": "neck"}, lambda: None)
    with pytest.raises(ValueError, match="'neck' is neither a sub-module nor a method"):
        with timer.installed():
            pass


def test_environment_records_threads_and_hardware():
    env = describe_environment("cpu")
    assert env["threads"] == torch.get_num_threads() and env["logical_cpus"] >= 1 and env["cpu"]


def test_runner_writes_metrics_and_report(tmp_path):
    from baselines.latency import run_latency
    from istr.config import build_config
    from istr.config import ConfigError

    threads = torch.get_num_threads()
    cfg = build_config("tiny", ["num_threads=1"])
    options = {"sizes": [[64, 96]], "warmup": 0, "runs": 1, "cases": ["istr", "istr_fast", "maskrcnn_100"]}
    try:
        metrics = run_latency(cfg, tmp_path, options)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["time_ms"] == pytest.approx(metrics["time_ms"]) and saved["fps"] == pytest.approx(1e3 / saved["time_ms"])
    assert saved["headline"] == {"model": "istr", "case": "istr_fast", "size": [64, 96]}
    cases = saved["sizes"]["64x96"]
    assert set(cases) == {"istr", "istr_fast", "maskrcnn_100"}
    assert cases["istr"]["detections"] == 100  # top-100 of 10 proposals x 80 classes, none dropped as empty
    assert cases["maskrcnn_100"]["detections"] == 100
    assert set(saved["ratios"]["64x96"]) == {"istr_fast/maskrcnn_100", "istr/maskrcnn_100"}
    assert saved["environment"]["threads"] == 1
    assert "| istr_fast |" in (tmp_path / "latency.md").read_text()
    with pytest.raises(ConfigError, match="unknown sizez"):
        run_latency(cfg, tmp_path / "bad", {"sizez": [[64, 96]]})
