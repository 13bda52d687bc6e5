"""istr.models.fast: the inference fast path computes the same function.

Stated tolerance: detections (scores, boxes in pixels) and raw stage outputs agree with the original model to
1e-4 absolute / 1e-4 relative (float32 rounding of the folded weights); pasted mask probabilities to 1e-3 absolute,
because each pixel samples its mask at a position that moves with the box (measured: 2.3e-4 at most here).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from istr.config import build_config
from istr.models import build_model
from istr.models.fast import fold_all_batch_norms, fold_batch_norm, optimize_for_inference

TOL = {"rtol": 1e-4, "atol": 1e-4}
MASK_TOL = {"rtol": 0.0, "atol": 1e-3}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_batch_norms(model: nn.Module) -> None:
    """Non-trivial frozen statistics, so that folding has something to fold."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)


def test_fold_batch_norm_matches_conv_then_bn():
    torch.manual_seed(0)
    for bias in (False, True):
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias)
        bn = FrozenBatchNorm2d(6)
        randomize_batch_norms(bn)
        x = torch.randn(2, 4, 9, 11)
        torch.testing.assert_close(fold_batch_norm(conv, bn)(x), bn(conv(x)), **TOL)


def test_training_mode_batch_norm_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="training mode"):
        fold_all_batch_norms(model)


@pytest.fixture(scope="module")
def istr_pair():
    torch.manual_seed(0)
    cfg = build_config("tiny", ["model.num_classes=3"])
    model = build_model(cfg.model).eval()
    randomize_batch_norms(model)
    return model, optimize_for_inference(model)


def test_every_backbone_batch_norm_is_folded_and_the_original_is_untouched(istr_pair):
    model, fast = istr_pair
    count = lambda m: sum(isinstance(x, FrozenBatchNorm2d) for x in m.modules())
    assert count(model) == 20  # resnet18: stem + 16 in blocks + 3 downsample
    assert count(fast) == 0
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_istr_outputs_unchanged_within_tolerance(istr_pair):
    model, fast = istr_pair
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 50, 80, generator=g) * 255]
    with torch.inference_mode():
        expected, got = model(images, all_stages=True), fast(images, all_stages=True)
        pyramid, fast_pyramid = model.backbone(model.preprocess(images)[0]), fast.backbone(fast.preprocess(images)[0])
    for level in ("p2", "p3", "p4", "p5"):
        assert fast_pyramid[level].is_contiguous()  # NCHW again for RoIAlign
        torch.testing.assert_close(fast_pyramid[level], pyramid[level], **TOL)
    detections = 0
    for stage_expected, stage_got in zip(expected, got):
        for e, f in zip(stage_expected, stage_got):
            assert torch.equal(e["labels"], f["labels"])
            for key in ("scores", "boxes"):
                torch.testing.assert_close(f[key], e[key], **TOL)
            torch.testing.assert_close(f["masks"], e["masks"], **MASK_TOL)
            detections += len(e["scores"])
    assert detections > 0
