"""Backbone pretraining: crops, a classifier that learns, one cached weights file loadable by the detector."""
import os

import torch

from istr.config import build_config
from istr.engine.pretrain import CROP_SIZE, collect_crops, ensure_pretrained_backbone, train_classifier
from istr.models import build_model


def _tiny_cfg(tmp_path, **extra):
    overrides = {"data.cache_dir": str(tmp_path / "cache"), "pretrain.enabled": True, "pretrain.max_iter": 2,
                 "pretrain.batch_size": 4, "num_threads": 1}
    overrides.update(extra)
    return build_config("tiny", overrides)


def test_classifier_learns_separable_crops():
    torch.manual_seed(0)
    cfg = build_config("tiny", {"pretrain.max_iter": 40, "pretrain.batch_size": 16, "pretrain.lr": 1e-3})
    dark = torch.randint(0, 60, (32, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)
    bright = torch.randint(190, 255, (32, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)
    crops, labels = torch.cat([dark, bright]), torch.cat([torch.zeros(32), -torch.ones(32)]).long()
    state = train_classifier(cfg, crops, labels, num_classes=1)
    net = __import__("torchvision").models.resnet18(num_classes=2)
    net.load_state_dict(state, strict=False)
    net.fc.weight.data.zero_()  # trunk only was returned: check the features separate the two kinds
    net.eval()
    with torch.no_grad():
        mean = torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.model.pixel_std).view(1, 3, 1, 1)
        feats = torch.nn.Sequential(*list(net.children())[:-1])(((crops.float() - mean) / std)).flatten(1)
    gap = (feats[:32].mean(0) - feats[32:].mean(0)).norm()
    spread = feats[:32].std(0).norm() + feats[32:].std(0).norm()
    assert gap > 2 * spread, (gap.item(), spread.item())


def test_crops_cover_objects_and_background(tmp_path):
    from istr.data import build_datasets

    cfg = _tiny_cfg(tmp_path)
    train, _ = build_datasets(cfg, train_transforms=False)
    crops, labels = collect_crops(train, torch.Generator().manual_seed(0))
    objects = sum(len(train[i][1]["labels"]) for i in range(len(train)))
    assert crops.shape[1:] == (3, CROP_SIZE, CROP_SIZE) and crops.dtype == torch.uint8
    assert int((labels >= 0).sum()) == objects
    assert 0 < int((labels < 0).sum()) <= 2 * len(train)


def test_pretrained_weights_are_cached_and_load_into_the_detector(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    path = ensure_pretrained_backbone(cfg)
    stamp = os.stat(path).st_mtime_ns
    assert ensure_pretrained_backbone(cfg) == path and os.stat(path).st_mtime_ns == stamp  # not trained again
    state = torch.load(path, weights_only=True)
    cfg.model.backbone.weights = path
    model = build_model(cfg.model)
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    other = _tiny_cfg(tmp_path, **{"pretrain.lr": 5e-4})
    assert ensure_pretrained_backbone(other) != path  # keyed by the pretraining config


def test_training_seeds_share_one_pretrained_trunk(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    assert ensure_pretrained_backbone(cfg) == ensure_pretrained_backbone(_tiny_cfg(tmp_path, seed=cfg.seed + 1))
