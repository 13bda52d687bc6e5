"""Backbone pretraining: crops, a classifier that learns, one cached weights file loadable by the detector."""
import json
import os
from pathlib import Path

import pytest
import torch
import torchvision

from istr.config import build_config
from istr.engine.pretrain import CROP_SIZE, collect_crops, ensure_pretrained_backbone, train_classifier
from istr.models import build_model


def _tiny_cfg(tmp_path, **extra):
    overrides = {"data.cache_dir": str(tmp_path / "cache"), "pretrain.enabled": True, "pretrain.max_iter": 2,
                 "pretrain.batch_size": 4, "num_threads": 1}
    overrides.update(extra)
    return build_config("tiny", overrides)


def _stripes(n, vertical, generator):
    """Crops of two random colours in stripes 4 px wide: the classes differ in orientation only, not in brightness."""
    coord = torch.arange(CROP_SIZE)
    on = (((coord[None] + torch.randint(0, 8, (n, 1), generator=generator)) // 4) % 2).float()
    pattern = (on[:, None, :] if vertical else on[:, :, None]).expand(n, CROP_SIZE, CROP_SIZE)[:, None]
    first, second = (torch.rand(n, 3, 1, 1, generator=generator) * 255 for _ in range(2))
    return (first * pattern + second * (1 - pattern)).to(torch.uint8)


def test_classifier_learns_crops_an_untrained_trunk_cannot_tell_apart():
    generator = torch.Generator().manual_seed(0)
    crops = torch.cat([_stripes(32, False, generator), _stripes(32, True, generator)])
    labels = torch.cat([torch.zeros(32), -torch.ones(32)]).long()  # horizontal = class 0, vertical = background
    cfg = build_config("tiny", {"pretrain.max_iter": 40, "pretrain.batch_size": 16, "pretrain.lr": 1e-3})
    mean = torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.pixel_std).view(1, 3, 1, 1)

    def separation(state=None):
        """Distance of the two kinds' mean trunk features over their spread (the trunk only: no fc)."""
        torch.manual_seed(1)
        net = torchvision.models.resnet18(num_classes=2)
        if state is not None:
            net.load_state_dict(state, strict=False)
        with torch.no_grad():
            feats = torch.nn.Sequential(*list(net.eval().children())[:-1])((crops.float() - mean) / std).flatten(1)
        gap = (feats[:32].mean(0) - feats[32:].mean(0)).norm()
        return (gap / (feats[:32].std(0).norm() + feats[32:].std(0).norm())).item()

    untrained = separation()  # measured 0.13
    trained = separation(train_classifier(cfg, crops, labels, num_classes=1))  # measured 0.72
    assert trained > 4 * untrained, (trained, untrained)


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
    info = json.loads((Path(path).parent / "info.json").read_text())
    assert info["iterations"] == 2 and info["resumed"] is False
    assert not (Path(path).parent / "train_state.pth").exists()  # the resume state goes once the trunk is written
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


def test_a_stopped_pretraining_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Stopped in the forward of iteration 7 (after the periodic save at 5): the stop saves iteration 6, the next
    call continues from it and ends with the weights of an uninterrupted run; the state file goes once done."""
    import istr.engine.pretrain as pretrain

    monkeypatch.setattr(pretrain, "CHECKPOINT_PERIOD", 5)
    generator = torch.Generator().manual_seed(0)
    crops = torch.cat([_stripes(8, False, generator), _stripes(8, True, generator)])
    labels = torch.cat([torch.zeros(8), -torch.ones(8)]).long()
    cfg = build_config("tiny", {"pretrain.max_iter": 9, "pretrain.batch_size": 4, "pretrain.lr": 1e-3})
    full = train_classifier(cfg, crops, labels, num_classes=1)

    real_cross_entropy, calls = pretrain.F.cross_entropy, []

    def stop_at_seventh(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_cross_entropy(*args, **kwargs)

    state_path = tmp_path / "train_state.pth"
    monkeypatch.setattr(pretrain.F, "cross_entropy", stop_at_seventh)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg, crops, labels, num_classes=1, state_path=state_path)
    monkeypatch.setattr(pretrain.F, "cross_entropy", real_cross_entropy)
    assert torch.load(state_path, weights_only=False)["iteration"] == 6
    resumed = train_classifier(cfg, crops, labels, num_classes=1, state_path=state_path)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
