"""pytest-benchmark: batch-1 inference of ISTR and Mask R-CNN, and one smoke-scale training step of each.

    .venv/bin/python -m pytest benchmarks/ --benchmark-only [--benchmark-save=NAME | --benchmark-compare]

Environment: ISTR_BENCH_SIZE (default 800x1333), ISTR_BENCH_BACKBONE (resnet50), ISTR_BENCH_THREADS (2),
ISTR_BENCH_ROUNDS (3). pytest-benchmark times one case after another; the interleaved protocol with the
backbone / head / post split is ``python -m baselines.latency`` (and the ``latency`` runner).
Not collected by the default ``pytest`` run (testpaths = tests).
"""
from __future__ import annotations

import os

import pytest
import torch

from baselines.latency import CASE_DESCRIPTIONS, build_cases, load_images
from istr.config import build_config

SIZE = [int(v) for v in os.environ.get("ISTR_BENCH_SIZE", "800x1333").split("x")]
BACKBONE = os.environ.get("ISTR_BENCH_BACKBONE", "resnet50")
ROUNDS = int(os.environ.get("ISTR_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ISTR_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases():
    cfg = build_config("paper", {"model.backbone.name": BACKBONE, "device": "cpu"})
    return {case.name: case.model for case in build_cases(cfg, list(CASE_DESCRIPTIONS))}


@pytest.fixture(scope="module")
def image():
    return load_images("synthetic", SIZE, 1)[0][0]


@pytest.mark.parametrize("name", list(CASE_DESCRIPTIONS))
def test_inference(benchmark, cases, image, name):
    model = cases[name]

    def run():
        with torch.inference_mode():
            return model([image])

    benchmark.extra_info.update(size=SIZE, backbone=BACKBONE, threads=torch.get_num_threads(), case=CASE_DESCRIPTIONS[name])
    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert len(out[0]["scores"]) <= 100


@pytest.fixture(scope="module")
def smoke_batch():
    from istr.data import build_datasets, collate

    cfg = build_config("smoke")
    train_ds, _ = build_datasets(cfg)
    cfg.model.num_classes = train_ds.num_classes
    return cfg, collate([train_ds[i] for i in range(cfg.solver.batch_size)])


@pytest.mark.parametrize("name", ["istr", "maskrcnn"])
def test_train_step_smoke(benchmark, smoke_batch, name):
    from baselines.latency import train_step
    from baselines.maskrcnn import build_maskrcnn
    from istr.engine.cpu_bf16 import bf16_products_in_fp32
    from istr.engine.schedule import build_optimizer
    from istr.models import build_model

    cfg, (images, targets) = smoke_batch
    torch.manual_seed(cfg.seed)
    model = (build_model(cfg.model) if name == "istr"
             else build_maskrcnn(cfg.model, anchor_scale=cfg.data.min_size_test / 800)).train()
    optimizer = build_optimizer(model, cfg.solver)
    products = bf16_products_in_fp32(cfg.solver.amp, "cpu")  # as the smoke jobs run on a CPU without native bf16

    def step():
        return train_step(model, optimizer, images, targets, cfg.solver, products)

    benchmark.extra_info.update(scale="smoke", amp=cfg.solver.amp, batch=cfg.solver.batch_size)
    assert torch.isfinite(benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1))
