"""Job-level pieces: the Figure 1 PCA job, the PCA cache, one config per run directory."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from istr.config import ConfigError, build_config
from istr.engine.job import _check_or_write_config, fit_pca_job, random_init_warning

torch.set_num_threads(1)


def test_fit_pca_job_writes_full_spectrum_once(tmp_path):
    cfg = build_config("tiny", {"data.cache_dir": str(tmp_path / "cache")})
    metrics = fit_pca_job(cfg, tmp_path / "fig1")
    ratios = metrics["explained_variance_ratio"]
    assert len(ratios) == 784 and metrics["num_masks"] > 16
    assert sum(ratios) == pytest.approx(1.0, abs=1e-4)
    assert all(a >= b - 1e-9 for a, b in zip(ratios, ratios[1:]))  # sorted, largest first
    assert json.loads((tmp_path / "fig1" / "metrics.json").read_text()) == metrics
    caches = list((tmp_path / "cache").glob("pca-*/pca.pt"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    (tmp_path / "fig1" / "metrics.json").unlink()
    assert fit_pca_job(cfg, tmp_path / "fig1") == metrics  # refitted from the cache, not recomputed
    assert caches[0].stat().st_mtime_ns == stamp


def test_run_directory_refuses_another_config(tmp_path):
    cfg = build_config("tiny")
    _check_or_write_config(cfg, tmp_path)
    _check_or_write_config(cfg, tmp_path)  # the same config resumes
    other = build_config("tiny", {"solver.lr": 0.5, "model.mask.components": 8})
    with pytest.raises(ConfigError, match="model.mask.components, solver.lr"):
        _check_or_write_config(other, tmp_path)


def test_run_directory_written_before_a_key_was_added_still_resumes(tmp_path):
    cfg = build_config("tiny")
    _check_or_write_config(cfg, tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["solver"]["optimizer"], saved["solver"]["momentum"]  # as written before these keys existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_or_write_config(cfg, tmp_path)  # same run: resumes
    with pytest.raises(ConfigError, match="solver.optimizer"):
        _check_or_write_config(build_config("tiny", {"solver.optimizer": "sgd"}), tmp_path)


def test_real_data_from_a_random_resnet_is_warned_about():
    assert "resnet50 starts from random weights on coco" in random_init_warning(build_config("paper"))
    assert random_init_warning(build_config("paper", {"model.backbone.weights": "/w/resnet50.pth"})) is None
    assert random_init_warning(build_config("smoke")) is None  # synthetic data: its own pretraining
    assert random_init_warning(build_config("tiny", {"data.dataset": "/data/my_coco"})) is not None
