"""ResNet + FPN backbone (torchvision modules), detectron2 freezing semantics, local weight loading."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from istr.config import BackboneConfig

# Stages in freezing order: freeze_at = k freezes the first k of them (detectron2: 1 = stem, 2 = stem + res2).
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
FEATURE_STRIDES = (4, 8, 16, 32)  # p2..p5


class Backbone(nn.Module):
    """ResNet trunk (``.body``) + FeaturePyramidNetwork (``.fpn``).

    forward(images [B, 3, H, W]) -> OrderedDict p2, p3, p4, p5 ([B, C, H/s, W/s], s = 4, 8, 16, 32) and
    "pool" (p6 from LastLevelMaxPool, ignored by the head).
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        norm_layer = FrozenBatchNorm2d if cfg.norm == "frozen_bn" else nn.BatchNorm2d
        resnet = getattr(torchvision.models, cfg.name)(weights=None, norm_layer=norm_layer)
        if cfg.weights:
            load_resnet_weights(resnet, cfg.weights)
        c5 = resnet.fc.in_features
        in_channels = [c5 // 8, c5 // 4, c5 // 2, c5]
        _freeze(resnet, cfg.freeze_at)
        wrapped = BackboneWithFPN(
            resnet,
            return_layers={"layer1": "p2", "layer2": "p3", "layer3": "p4", "layer4": "p5"},
            in_channels_list=in_channels,
            out_channels=cfg.fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.body = wrapped.body
        self.fpn = wrapped.fpn
        self.out_channels = cfg.fpn_channels

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(images))


def _freeze(resnet: nn.Module, freeze_at: int) -> None:
    """Freeze the first ``freeze_at`` stages: no gradients, and BatchNorm there becomes FrozenBatchNorm2d."""
    for stage in _STAGES[:freeze_at]:
        for name in stage:
            module = getattr(resnet, name)
            module.requires_grad_(False)
            setattr(resnet, name, _frozen_norms(module))


def _frozen_norms(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d inside ``module`` by a FrozenBatchNorm2d holding its statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _frozen_norms(child))
    return module


def load_resnet_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state dict (``fc.*`` ignored) from a local file.

    Also accepts ``{"model": sd}`` / ``{"state_dict": sd}`` wrappers and keys prefixed by ``body.`` or
    ``backbone.body.`` (our own checkpoints). Raises ValueError listing missing/unexpected keys.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"backbone weights {path}: cannot read ({err.__class__.__name__}: {err})") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights {path}: expected a state dict, got {type(state).__name__}")
    state = _strip_prefix(state)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    missing = sorted(expected - state.keys())
    unexpected = sorted(k for k in state.keys() - expected if not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise ValueError(f"backbone weights {path}: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    resnet.load_state_dict(state, strict=False)


def _strip_prefix(state: dict) -> dict:
    for prefix in ("backbone.body.", "body."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state

