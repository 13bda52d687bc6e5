"""experiments.mask_fit: per-coefficient R^2 and mask IoU of matched predictions."""
import pytest
import torch

from experiments import mask_fit
from istr.config import build_config
from istr.engine.job import train_and_evaluate
from istr.models.mask_coding import MaskCodec, soften


def test_coefficient_fit_scores_perfect_mean_and_partial_predictions():
    torch.manual_seed(0)
    codec = MaskCodec.placeholder(8, resolution=4)  # embedding = logits of the first 8 of 16 pixels
    masks = (torch.rand(20, 4, 4) > 0.5).float()
    gt = codec.encode(soften(masks, 0.01, 0.05))
    perfect = mask_fit.coefficient_fit(gt, gt, masks, codec)
    assert perfect["r2"].tolist() == pytest.approx([1.0] * 8)
    assert perfect["iou"] == perfect["iou_ceiling"] and set(perfect["iou_first"]) == {5}
    mean = mask_fit.coefficient_fit(gt.mean(0).expand_as(gt), gt, masks, codec)
    assert mean["r2"].abs().max() < 1e-5  # predicting the mean explains nothing
    # the unencoded half of the pixels decodes to 0.5 -> foreground: the ceiling is not 1 with 8 of 16 pixels
    assert 0.0 < perfect["iou_ceiling"] < 1.0
    half = gt.clone()
    half[:, 4:] = gt.mean(0)[4:]
    partial = mask_fit.coefficient_fit(half, gt, masks, codec)
    assert partial["r2"][:4].tolist() == pytest.approx([1.0] * 4) and partial["r2"][4:].abs().max() < 1e-5


def test_cli_reports_a_trained_run_and_rejects_an_unfinished_one(tmp_path, capsys):
    cfg = build_config("tiny", {"data.cache_dir": str(tmp_path / "cache")})
    train_and_evaluate(cfg, tmp_path / "run")
    assert mask_fit.main([str(tmp_path / "run"), "--images", "4", "--out", str(tmp_path / "fit")]) == 0
    text = (tmp_path / "fit.md").read_text()
    assert "l=16" in text and "R^2" in text and "ground truth (codec ceiling)" in text
    fit = mask_fit.fit_of_run(tmp_path / "run", 4)
    assert fit["r2"].shape == (16,) and 0.5 < fit["iou_ceiling"] <= 1.0 and 0.0 <= fit["iou"] <= 1.0
    assert mask_fit.main([str(tmp_path)]) == 2
    assert "no checkpoints/final.pth" in capsys.readouterr().err
