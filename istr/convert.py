"""Convert an official ISTR checkpoint (detectron2 layout) into ours, without detectron2.

    python -m istr.convert OFFICIAL.pth OUT.pth [--components 60]

OFFICIAL.pth is a pickled dict holding "model" (tensors or numpy arrays). Keys are renamed by the rules
in ``RULES`` (regular expressions, never a hand-made key list); tensor layouts already agree (DynamicConv's
parameter split and out_layer's cell-major input are the official ones). The model's shape (depth,
stages, proposals, classes, mask components) is read off the checkpoint. Any official key no rule maps,
or any of our keys nothing fills, or a shape mismatch, fails with the full lists (one line, exit 2) and writes nothing.
OUT.pth holds ``{"model": state_dict, "config": to_dict(cfg), "source": OFFICIAL.pth}``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from istr.config import Config, build_config, to_dict

_BB = r"backbone\.bottom_up\."


def _layer(match: re.Match) -> str:
    return f"layer{int(match['stage']) - 1}.{match['block']}"


# (official key pattern, our key): applied in order, the first full match wins.
RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (_BB + r"stem\.conv1\.norm\.(?P<p>.+)", lambda m: f"backbone.body.bn1.{m['p']}"),
    (_BB + r"stem\.conv1\.(?P<p>weight|bias)", lambda m: f"backbone.body.conv1.{m['p']}"),
    (_BB + r"res(?P<stage>[2-5])\.(?P<block>\d+)\.shortcut\.norm\.(?P<p>.+)",
     lambda m: f"backbone.body.{_layer(m)}.downsample.1.{m['p']}"),
    (_BB + r"res(?P<stage>[2-5])\.(?P<block>\d+)\.shortcut\.(?P<p>weight|bias)",
     lambda m: f"backbone.body.{_layer(m)}.downsample.0.{m['p']}"),
    (_BB + r"res(?P<stage>[2-5])\.(?P<block>\d+)\.conv(?P<n>\d)\.norm\.(?P<p>.+)",
     lambda m: f"backbone.body.{_layer(m)}.bn{m['n']}.{m['p']}"),
    (_BB + r"res(?P<stage>[2-5])\.(?P<block>\d+)\.conv(?P<n>\d)\.(?P<p>weight|bias)",
     lambda m: f"backbone.body.{_layer(m)}.conv{m['n']}.{m['p']}"),
    (r"backbone\.fpn_lateral(?P<k>[2-5])\.(?P<p>weight|bias)",
     lambda m: f"backbone.fpn.inner_blocks.{int(m['k']) - 2}.0.{m['p']}"),
    (r"backbone\.fpn_output(?P<k>[2-5])\.(?P<p>weight|bias)",
     lambda m: f"backbone.fpn.layer_blocks.{int(m['k']) - 2}.0.{m['p']}"),
    (r"head\.head_series\.(?P<rest>.+)", lambda m: f"head.stages.{m['rest']}"),
    (r"(?P<name>pos_embeddings|init_proposal_boxes)\.weight", lambda m: f"{m['name']}.weight"),
    (r"mask_encoding\.components", lambda m: "mask_codec.components"),
    (r"mask_encoding\.explained_variances", lambda m: "mask_codec.explained_variance"),
    (r"mask_encoding\.means", lambda m: "mask_codec.mean"),
]
# Ours, absent from the official layout by design: filled here, not reported as missing.
NOT_IN_OFFICIAL = re.compile(r".*codec\.(total_variance|_extra_state)|.*num_batches_tracked")
_BACKBONES = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}


class ConversionError(ValueError):
    """The checkpoint does not map onto our model; the message lists every offending key."""


def official_to_ours(key: str) -> Optional[str]:
    """Our state-dict key for an official key, or None when no rule applies."""
    for pattern, target in RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return target(match)
    return None


def infer_config(official: dict[str, Tensor], components: Optional[int] = None) -> Config:
    """The paper config with depth, stages, proposals, width, classes and mask length read off the weights."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in official:
            raise ConversionError(f"official checkpoint has no '{key}'; is it an ISTR (detectron2) checkpoint?")
        return tuple(official[key].shape)

    res4 = {int(m[1]) for k in official if (m := re.match(_BB + r"res4\.(\d+)\.", k))}
    bottleneck = any(re.match(_BB + r"res2\.0\.conv3\.", k) for k in official)
    if (len(res4), bottleneck) not in _BACKBONES:
        raise ConversionError(f"cannot tell the ResNet depth: {len(res4)} res4 blocks, bottleneck={bottleneck}")
    stages = {int(m[1]) for k in official if (m := re.match(r"head\.head_series\.(\d+)\.", k))}
    mask_dim = shape("head.head_series.0.mask_logits.weight")[0]
    if components is not None and components != mask_dim:
        raise ConversionError(f"--components {components} does not match the checkpoint's mask_logits ({mask_dim} outputs)")
    proposals, hidden = shape("init_proposal_boxes.weight")[0], shape("head.head_series.0.norm1.weight")[0]
    return build_config("paper", {
        "model.backbone.name": _BACKBONES[(len(res4), bottleneck)],
        "model.head.num_stages": len(stages),
        "model.head.num_proposals": proposals,
        "model.head.hidden_dim": hidden,
        "model.backbone.fpn_channels": hidden,
        "model.head.dim_feedforward": shape("head.head_series.0.linear1.weight")[0],
        "model.head.dynamic_dim": shape("head.head_series.0.inst_interact.norm1.weight")[0],
        "model.num_classes": shape("head.head_series.0.class_logits.weight")[0],
        "model.mask.components": mask_dim,
    })


def convert_state_dict(official: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Map ``official`` onto the keys of ``ours`` (our model's state dict, which supplies what the official
    layout lacks by design); ConversionError lists unmapped, missing and mis-shaped keys."""
    converted, unmapped = {}, []
    for key, value in official.items():
        target = official_to_ours(key)
        if target is None or target not in ours:
            unmapped.append(key if target is None else f"{key} -> {target} (not in our model)")
            continue
        converted[target] = torch.as_tensor(value)
    _fill_aliases(converted, ours)
    missing = sorted(k for k in ours if k not in converted and not NOT_IN_OFFICIAL.fullmatch(k))
    shapes = [f"{k}: official {tuple(v.shape)} vs ours {tuple(ours[k].shape)}" for k, v in converted.items()
              if tuple(v.shape) != tuple(ours[k].shape)]
    if unmapped or missing or shapes:
        parts = [f"{len(unmapped)} unmapped official keys: {', '.join(sorted(unmapped))}" if unmapped else "",
                 f"{len(missing)} of our keys missing: {', '.join(missing)}" if missing else "",
                 f"{len(shapes)} shape mismatches: {'; '.join(shapes)}" if shapes else ""]
        raise ConversionError("; ".join(p for p in parts if p))
    out = dict(ours)
    out.update({k: v.to(ours[k].dtype) for k, v in converted.items()})
    for key in out:
        if key.endswith("codec._extra_state"):
            out[key] = {"representation": "pca", "fitted": True, "source": "official checkpoint"}
        elif key.endswith("codec.total_variance"):  # not stored officially: explained-variance ratios are unknown
            out[key] = torch.tensor(float("nan"))
    return out


def _fill_aliases(converted: dict[str, Tensor], ours: dict[str, Any]) -> None:
    """Our keys that name the same tensor as a converted key (the codec is shared by the model, the
    criterion and the matcher) get the converted value too."""
    storage = {}
    for key, value in ours.items():
        if isinstance(value, Tensor) and value.numel():
            storage.setdefault((value.data_ptr(), tuple(value.shape)), []).append(key)
    for keys in storage.values():
        source = next((k for k in keys if k in converted), None)
        for key in keys:
            if source is not None and key not in converted:
                converted[key] = converted[source]


def load_official(path: str | Path) -> dict[str, Any]:
    """The "model" dict of an official checkpoint (weights-only unpickling: no code runs)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except Exception as err:  # torch raises many types for foreign or truncated files
        raise ConversionError(f"{path}: cannot read as a checkpoint of tensors ({_load_failure(err)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ConversionError(f"{path}: expected a dict holding 'model' (a state dict), got {type(checkpoint).__name__}")
    return checkpoint["model"]


def _load_failure(err: Exception) -> str:
    """torch.load's reason in a few words, without its advice to unpickle with weights_only=False (that runs
    whatever code the file holds)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0].split(". ")[0].strip()
        if detail.startswith("Unsupported global"):
            return f"it pickles more than tensors, numbers and containers: {detail}"
        return f"not a torch checkpoint: {detail or 'unreadable pickle'}"
    return text.splitlines()[0] if text else type(err).__name__


def convert(official_path: str | Path, out_path: str | Path, components: Optional[int] = None) -> Config:
    """Read, map, check by loading into a freshly built model, then write ``out_path`` atomically."""
    from istr.engine.checkpoint import atomic_save
    from istr.models import build_model

    official = load_official(official_path)
    try:
        cfg = infer_config(official, components)
        model = build_model(cfg.model)
        state = convert_state_dict(official, model.state_dict())
    except ConversionError as err:
        raise ConversionError(f"{official_path}: {err}") from None
    model.load_state_dict(state)  # strict: proves the result loads
    atomic_save({"model": model.state_dict(), "config": to_dict(cfg), "source": str(official_path)}, out_path)
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m istr.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("official", help="official ISTR checkpoint (detectron2 layout, a dict holding 'model')")
    parser.add_argument("output", help="converted checkpoint to write")
    parser.add_argument("--components", type=int, default=None, help="expected mask embedding length (e.g. 60)")
    args = parser.parse_args(argv)
    try:
        cfg = convert(args.official, args.output, args.components)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = cfg.model
    print(f"wrote {args.output}: {m.backbone.name}, {m.head.num_stages} stages, {m.head.num_proposals} proposals, "
          f"{m.num_classes} classes, l={m.mask.components}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
