"""The latency protocol (istr.engine.latency) and the latency runner (baselines.latency)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from istr.engine import latency
from istr.engine.latency import LatencyCase, PartTimer, describe_environment, measure_latency


class VirtualClock:
    """The protocol's clock in these tests: it advances only when a toy module "works", so timings are exact."""

    def __init__(self):
        self.seconds = 0.0

    def perf_counter(self) -> float:
        return self.seconds

    def sleep(self, seconds: float) -> None:
        self.seconds += seconds


CLOCK = VirtualClock()


@pytest.fixture
def virtual_clock(monkeypatch):
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=CLOCK.perf_counter))


class Sleeper(nn.Module):
    def __init__(self, seconds: float, log: list, name: str):
        super().__init__()
        self.seconds, self.log, self.name = seconds, log, name

    def forward(self, x):
        self.log.append((self.name, torch.is_inference_mode_enabled(), self.training))
        CLOCK.sleep(self.seconds)
        return x


class ToyDetector(nn.Module):
    """backbone 20 ms, head 10 ms, a post-processing method 5 ms (of virtual time)."""

    def __init__(self, log: list, name: str):
        super().__init__()
        self.backbone, self.head, self.log, self.name = Sleeper(0.02, log, name), Sleeper(0.01, log, name), log, name

    def postprocess(self, x):
        CLOCK.sleep(0.005)
        return [{"n": x.shape[-1]}]

    def forward(self, images):
        return self.postprocess(self.head(self.backbone(images[0])))


PARTS = {"backbone": "backbone", "head": "head", "post": "postprocess"}


def test_parts_medians_and_protocol(virtual_clock):
    log: list = []
    a, b = ToyDetector(log, "A"), ToyDetector(log, "B")
    b.train()
    cases = [LatencyCase("A", a, PARTS, lambda out: {"detections": float(out[0]["n"])}), LatencyCase("B", b, PARTS)]
    images = [torch.zeros(3, 4, 5), torch.zeros(3, 4, 7)]
    results = measure_latency(cases, images, warmup=1, runs=4)
    for name in ("A", "B"):
        s = results[name].summary()
        assert s["runs"] == 4
        assert s["parts_ms"]["backbone"] == pytest.approx(20)
        assert s["parts_ms"]["head"] == pytest.approx(10)
        assert s["parts_ms"]["post"] == pytest.approx(5)
        assert s["parts_ms"]["other"] == pytest.approx(0, abs=1e-9)
        assert s["time_ms"] == pytest.approx(35) and s["fps"] == pytest.approx(1e3 / 35)
        assert s["q1_ms"] == pytest.approx(35) and s["q3_ms"] == pytest.approx(35)
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
    assert env["cpu_capability"] in ("DEFAULT", "VSX", "ZVECTOR", "AVX2", "AVX512", "SVE256")
    assert env["cpu_native_bf16"] in (True, False, None)


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


def test_untrained_deep_models_keep_detections_like_trained_ones():
    """R101 at identity FrozenBN statistics: features reach ~1e7 and untrained Mask R-CNN keeps nothing unless
    the residual blocks start as the identity and the classifier is confident (baselines.latency)."""
    from baselines.latency import build_cases, load_images
    from istr.config import build_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = {c.name: c.model for c in build_cases(build_config("paper", ["model.backbone.name=resnet101"]),
                                                      ["istr", "maskrcnn"])}
        image = load_images("synthetic", (128, 192), 1)[0][0]
        with torch.inference_mode():
            features = cases["maskrcnn"].backbone(image[None] / 255.0)
            detections = cases["maskrcnn"]([image])[0]
    finally:
        torch.set_num_threads(threads)
    assert max(f.abs().max().item() for f in features.values()) < 1e4
    assert len(detections["boxes"]) > 10


def _job(device: str, gpu: str | None, istr_ms: float, maskrcnn_ms: float) -> dict:
    case = lambda ms: {"time_ms": ms, "iqr_ms": 1.0, "fps": 1e3 / ms, "detections": 100.0, "box_area_fraction": 0.03,
                       "parts_ms": {"backbone": ms / 2, "head": ms / 4, "post": ms / 8, "other": ms / 8}}
    env = {"device": device, "torch": "2.x", "threads": 2, "logical_cpus": 2, "cpu": "Test CPU", "load_average_1m": 0.5}
    return {"backbone": "resnet50", "environment": {**env, **({"gpu": gpu} if gpu else {})},
            "protocol": {"batch": 1, "dtype": "float32", "mode": "eval", "warmup": 1, "runs": 3, "order": "ABBA",
                         "statistic": "median", "images": ["3 images"], "weights": "untrained"},
            "sizes": {"800x1333": {"istr_fast": case(istr_ms), "maskrcnn": case(maskrcnn_ms)}},
            "ratios": {"800x1333": {"istr_fast/maskrcnn": {"of_medians": istr_ms / maskrcnn_ms, "paired": istr_ms / maskrcnn_ms}}},
            "cases": {"istr_fast": "ISTR", "maskrcnn": "Mask R-CNN"}}


def test_report_merges_machines_from_included_json(tmp_path, capsys):
    """A GPU machine's JSON rendered next to this machine's measurements: one section per machine, with
    its device name, each with its own ratio; a bad --include fails with one line and writes nothing."""
    from baselines.latency import main

    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps([_job("cuda", "NVIDIA H100 80GB HBM3", 37.0, 46.0)]))
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps(_job("cpu", None, 2900.0, 4500.0)))
    out = tmp_path / "report" / "latency.md"
    assert main(["--backbones", "--include", str(cpu), str(gpu), "--output", str(out), "--note", "merged"]) == 0
    text = out.read_text()
    assert "## NVIDIA H100 80GB HBM3" in text and "## Test CPU, 2 threads" in text
    assert "| istr_fast/maskrcnn | 0.804 |" in text and "| istr_fast/maskrcnn | 0.644 |" in text
    assert "Note: merged" in text and "ISTR R50 72.5 ms" in text  # the paper's figure, marked as reported
    assert len(json.loads(out.with_suffix(".json").read_text())) == 2

    (tmp_path / "bad.json").write_text("{\"fps\": 1}")
    bad_out = tmp_path / "bad" / "latency.md"
    assert main(["--backbones", "--include", str(tmp_path / "bad.json"), "--output", str(bad_out)]) == 2
    assert not bad_out.parent.exists()
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["--backbones", "--output", str(bad_out)]) == 2


def test_two_cpus_of_one_model_name_are_two_sections(tmp_path):
    """An AVX2-only and an AVX-512 "AMD EPYC" are different machines: each gets its own section and ratio;
    a JSON written before the SIMD level was recorded keeps its plain heading."""
    from baselines.latency_report import render_markdown

    zen1, zen4, old = (_job("cpu", None, ms, 9000.0) for ms in (6300.0, 3100.0, 3000.0))
    zen1["environment"].update(cpu="AMD EPYC", cpu_capability="AVX2", cpu_native_bf16=False)
    zen4["environment"].update(cpu="AMD EPYC", cpu_capability="AVX512", cpu_native_bf16=True)
    old["environment"].update(cpu="AMD EPYC")
    text = render_markdown([zen1, zen4, old])
    assert "## AMD EPYC (AVX2, no native bf16), 2 threads" in text
    assert "## AMD EPYC (AVX512), 2 threads" in text and "## AMD EPYC, 2 threads" in text
    assert text.count("| istr_fast/maskrcnn | 0.700 |") == 1 and text.count("| istr_fast/maskrcnn | 0.344 |") == 1
    assert "Training step" not in text
    steps = lambda istr_s, maskrcnn_s, amp: {"istr": {"median_s": istr_s, "iqr_s": 0.1, "steps": 6},
                                             "maskrcnn": {"median_s": maskrcnn_s, "iqr_s": 0.1, "steps": 6},
                                             "ratio": istr_s / maskrcnn_s, "setting": f"smoke preset, amp {amp}"}
    zen1["train_step"], old["train_step"] = steps(2.7, 6.0, "none"), steps(0.93, 1.76, "bf16")
    text = render_markdown([zen1, zen4, old])
    assert "## Training step (smoke scale): AMD EPYC (AVX2, no native bf16), 2 threads" in text
    assert "## Training step (smoke scale): AMD EPYC, 2 threads" in text
    assert "ISTR / Mask R-CNN: **0.45**" in text and "ISTR / Mask R-CNN: **0.53**" in text
    # another AVX2 "AMD EPYC" on another day is its own section too, not the first one's tables under its heading
    later = _job("cpu", None, 5700.0, 9000.0)
    later["environment"].update(cpu="AMD EPYC", cpu_capability="AVX2", cpu_native_bf16=False, date="2026-12-07")
    text = render_markdown([zen1, later])
    assert "## AMD EPYC (AVX2, no native bf16), 2 threads\n" in text
    assert "## AMD EPYC (AVX2, no native bf16), 2 threads, 2026-12-07\n" in text
    assert text.count("| istr_fast/maskrcnn | 0.700 |") == 1 and text.count("| istr_fast/maskrcnn | 0.633 |") == 1


def test_train_steps_time_both_models_under_the_asked_autocast(tmp_path, monkeypatch):
    """Train-step timing at tiny scale: both models timed for the asked steps, the setting names the autocast, and a
    bf16 request on a CPU without native bf16 says first that its products are computed in fp32."""
    from baselines.latency import measure_train_steps
    from istr.engine import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda cpuinfo=None: False)
    lines = []
    out = measure_train_steps("tiny", steps=2, log=lines.append,
                              overrides={"data.cache_dir": str(tmp_path), "solver.amp": "none"})
    assert out["istr"]["steps"] == out["maskrcnn"]["steps"] == 2
    assert out["ratio"] == pytest.approx(out["istr"]["median_s"] / out["maskrcnn"]["median_s"])
    assert "amp none" in out["setting"] and not any(line.startswith("warning") for line in lines)
    lines.clear()
    out = measure_train_steps("tiny", steps=1, log=lines.append,
                              overrides={"data.cache_dir": str(tmp_path), "solver.amp": "bf16"})
    assert out["istr"]["steps"] == out["maskrcnn"]["steps"] == 1 and "amp bf16" in out["setting"]
    assert lines[0].startswith("note: solver.amp=bf16 on a CPU without native bf16") and "computed in fp32" in lines[0]
