"""The typed ISTR configuration, its scale presets and ``key=value`` overrides.

Defaults are the paper's R50-FPN model and 1x COCO schedule (``istr-reference-facts.md``).
Every Table 1 ablation is a value here:

    Table 1a  model.mask.representation = pca | raw     model.mask.components = 40 | 60 | 80 | 784
    Table 1b  model.matcher.mask_cost   = none | dice | l1 | cosine
    Table 1c  model.loss.mask_loss      = dice | l2 | l2+dice
    Table 1d  model.head.interaction    = dynamic | multihead
    Table 1e  model.head.init_features  = max | avg | pos | avg+pos

A config is plain nested dataclasses (type-checked by istr/dataclass_tree.py); ``to_dict``/``from_dict`` round-trip it through YAML or JSON,
and ``apply_overrides(cfg, ["model.mask.components=40"])`` returns a validated copy.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from istr.dataclass_tree import (  # noqa: F401  (ConfigError, parse_value and to_dict are this module's API too)
    ConfigError,
    build,
    get_value,
    parse_value,
    set_value,
    split_override,
    to_dict,
)
from istr.presets import PRESETS


# --------------------------------------------------------------------------------------------------
# The config tree
# --------------------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    name: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: Optional[str] = None  # local file: a torchvision ResNet state dict or our checkpoint
    freeze_at: int = 2  # 0 = train all, 1 = freeze stem, 2 = stem + res2 (official), ... 5
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    fpn_channels: int = 256  # equals head.hidden_dim in the official model


@dataclass
class HeadConfig:
    num_stages: int = 6
    num_proposals: int = 300
    hidden_dim: int = 256
    dim_feedforward: int = 2048
    num_heads: int = 8
    dynamic_dim: int = 64
    pooler_resolution: int = 7
    sampling_ratio: int = 2
    # RoIAlign implementation: "matmul" computes the same op as matrix products (faster CPU backward).
    pooler_impl: Literal["torchvision", "matmul"] = "torchvision"
    num_cls_layers: int = 3
    num_reg_layers: int = 3
    num_mask_layers: int = 3
    interaction: Literal["dynamic", "multihead"] = "dynamic"  # Table 1d
    init_features: Literal["max", "avg", "pos", "avg+pos"] = "avg+pos"  # Table 1e
    # Where the learned proposal boxes start. "image" is official (all = whole image); "grid" is a
    # CPU-scale deviation (boxes tiled over the image): a scratch backbone learned nothing from "image"
    # (cpu-training-facts.md); with the pretrained trunk "image" learns but ends 5 mask AP lower at smoke
    # scale, in scores and duplicates (reports/smoke_probes.md).
    proposal_init: Literal["image", "grid"] = "image"
    prior_prob: float = 0.01
    bbox_weights: tuple[float, float, float, float] = (2.0, 2.0, 1.0, 1.0)
    scale_clamp: float = 8.517193191416238  # log(1e5 / 16)


@dataclass
class MaskConfig:
    representation: Literal["pca", "raw"] = "pca"  # Table 1a: "raw" is the paper's "mask" row
    components: int = 60  # Table 1a: 40 / 60 / 80 / 784
    resolution: int = 28
    soft_r_max: float = 0.05  # soft label r = max(soft_r_max * U(0,1), soft_r_min)
    soft_r_min: float = 0.01
    pca_file: Optional[str] = None  # fitted PCA; None: fitted from the training set and cached


@dataclass
class MatcherConfig:
    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    cost_mask: float = 2.0
    mask_cost: Literal["none", "dice", "l1", "cosine"] = "cosine"  # Table 1b
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class LossConfig:
    weight_class: float = 2.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0
    weight_mask: float = 2.0
    mask_loss: Literal["dice", "l2", "l2+dice"] = "l2+dice"  # Table 1c
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    deep_supervision: bool = True


@dataclass
class ModelConfig:
    num_classes: int = 80  # replaced by the dataset's category count when a dataset is loaded
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    detections_per_image: int = 100
    mask_threshold: float = 0.5


@dataclass
class SyntheticConfig:
    num_train: int = 2000
    num_val: int = 200
    width: int = 176
    height: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    # "synthetic" (generated into cache_dir on first use) or a COCO-format directory / COCO 2017 root.
    dataset: str = "synthetic"
    train_images: Optional[str] = None  # explicit paths override the COCO 2017 layout under dataset
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    cache_dir: str = ".cache/istr"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    min_size_train: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    hflip_prob: float = 0.5
    crop_prob: float = 0.5  # the 3x-schedule crop; 0 disables it
    crop_pre_sizes: tuple[int, ...] = (400, 500, 600)
    crop_fraction: float = 0.7
    num_workers: int = 2
    max_val_images: Optional[int] = None  # evaluate on the first N val images only


@dataclass
class SolverConfig:
    batch_size: int = 16  # global, over all processes
    # ISTR trains with AdamW; "sgd" (momentum) is detectron2's Mask R-CNN recipe, for the Table 2 baseline.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # sgd only
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    backbone_lr_factor: float = 1.0  # the ResNet trunk's lr = lr * this (the FPN keeps lr)
    betas: tuple[float, float] = (0.9, 0.999)
    max_iter: int = 88715  # 12 epochs of COCO train2017 at batch 16
    steps: tuple[int, ...] = (66536, 81321)  # epochs 9 and 11
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    clip_grad_norm: float = 1.0
    amp: Literal["none", "bf16", "fp16"] = "none"
    # Train with channels_last convolution weights and maps; numerics change by float rounding only. At smoke
    # scale it was not faster on either 2-core CPU (AMD: 0.853 vs 0.823 s/it; Intel AMX: 0.84 vs 0.84), so presets
    # leave it off.
    channels_last: bool = False
    checkpoint_period: int = 5000
    log_period: int = 20
    # Learning curve: every eval_period iterations (0 = never) evaluate every stage on the first eval_images
    # val images and append a line to learning_curve.jsonl. Costs eval time, changes no training numerics.
    eval_period: int = 0
    eval_images: int = 50


@dataclass
class PretrainConfig:
    """Backbone pretraining on the training data: the offline substitute for ImageNet weights."""

    enabled: bool = False
    seed: int = 0  # its own seed: one pretrained trunk serves every variant and every training seed
    max_iter: int = 0
    lr: float = 1e-3
    batch_size: int = 16


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    seed: int = 40244023
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default
    eval_all_stages: bool = True


# Keys added after configs and results were saved, with the value that reproduces the behaviour from before
# they existed. A saved config without such a key means that value (``from_dict`` fills it in), and the
# experiment store leaves a key out of a job's hash while it has that value, so old results stay valid.
ADDED_KEYS: dict[str, Any] = {"solver.optimizer": "adamw", "solver.momentum": 0.9, "solver.channels_last": False}

# Bumped whenever evaluation changes what a trained model scores. metrics.json records it; a result evaluated
# under another protocol is stale and is evaluated again from its final checkpoint (not retrained).
# 1: masks pasted with torchvision's paste_masks_in_image. 2: continuous-coordinate paste (istr/models/paste.py).
EVAL_PROTOCOL = 2


def stale_evaluation(metrics: Any) -> bool:
    """A detector's metrics (they hold "final") evaluated under another EVAL_PROTOCOL."""
    return isinstance(metrics, dict) and "final" in metrics and metrics.get("eval_protocol") != EVAL_PROTOCOL


# --------------------------------------------------------------------------------------------------
# Building, overrides, files
# --------------------------------------------------------------------------------------------------
def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) nested dict; missing keys keep their defaults."""
    return build(Config, data or {})


def apply_overrides(cfg: Config, overrides: Any) -> Config:
    """A validated copy of ``cfg`` with overrides applied.

    ``overrides`` is a dict ``{"a.b": value}`` or a list of ``"a.b=value"`` strings (values parsed as YAML).
    """
    out = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for key, value in items:
        set_value(out, key, value)
    validate(out)
    return out


def starts_from_random_weights(cfg: Config) -> bool:
    """A real dataset (COCO or a custom one) trained from a randomly initialised ResNet, where the paper starts from
    ImageNet weights (only a local file gives them here; the synthetic data has its own pretraining)."""
    return cfg.data.dataset != "synthetic" and not cfg.model.backbone.weights and not cfg.pretrain.enabled


def validate(cfg: Config) -> None:
    """Cross-field checks that single-field typing cannot express."""
    m = cfg.model
    if m.mask.representation == "pca" and not 1 <= m.mask.components <= m.mask.resolution**2:
        raise ConfigError(f"model.mask.components: {m.mask.components} must be in 1..{m.mask.resolution ** 2}")
    if m.head.hidden_dim != m.backbone.fpn_channels:
        raise ConfigError(
            f"model.head.hidden_dim ({m.head.hidden_dim}) must equal model.backbone.fpn_channels ({m.backbone.fpn_channels})"
        )
    if m.head.hidden_dim % m.head.num_heads:
        raise ConfigError(f"model.head.hidden_dim ({m.head.hidden_dim}) must be divisible by model.head.num_heads ({m.head.num_heads})")
    for name in ("num_stages", "num_proposals", "hidden_dim", "num_classes"):
        value = getattr(m.head, name, None) if name != "num_classes" else m.num_classes
        if value is not None and value < 1:
            raise ConfigError(f"model.{'head.' if name != 'num_classes' else ''}{name}: must be >= 1, got {value}")
    if not 0 <= m.backbone.freeze_at <= 5:
        raise ConfigError(f"model.backbone.freeze_at: must be in 0..5, got {m.backbone.freeze_at}")
    if list(cfg.solver.steps) != sorted(cfg.solver.steps):
        raise ConfigError(f"solver.steps: must be increasing, got {list(cfg.solver.steps)}")


def build_config(scale: Optional[str] = None, overrides: Any = ()) -> Config:
    """Defaults <- scale preset <- overrides."""
    cfg = Config()
    if scale is not None:
        if scale not in PRESETS:
            raise ConfigError(f"unknown scale '{scale}'; choose one of {', '.join(PRESETS)}")
        cfg = apply_overrides(cfg, PRESETS[scale])
    return apply_overrides(cfg, overrides)


def preset_deviations(scale: str) -> dict[str, tuple[Any, Any]]:
    """``{key: (paper value, preset value)}`` for every key a preset changes from the paper defaults."""
    paper, preset = build_config("paper"), build_config(scale)
    out = {}
    for key in PRESETS[scale]:
        a, b = get_value(paper, key), get_value(preset, key)
        if a != b:
            out[key] = (a, b)
    return out


def dump(cfg: Config, path: str | Path) -> None:
    """Write YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    path = Path(path)
    data = to_dict(cfg)
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
    path.write_text(text)


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config ({err.__class__.__name__}: {err})") from err
    cfg = from_dict(data)
    validate(cfg)
    return cfg
