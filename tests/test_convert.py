"""istr.convert: official (detectron2-layout) checkpoints load into our model by rule."""
from __future__ import annotations

import re

import pytest
import torch

from istr.config import build_config, from_dict
from istr.convert import NOT_IN_OFFICIAL, main, official_to_ours
from istr.models import build_model

# The inverse of the converter's rules, written independently from istr-reference-facts.md ("Checkpoint layout").
INVERSE = [
    (r"backbone\.body\.conv1\.(.+)", lambda m: f"backbone.bottom_up.stem.conv1.{m[1]}"),
    (r"backbone\.body\.bn1\.(.+)", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.(.+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.{m[3]}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(.+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.(.+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.{m[4]}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(.+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(.+)", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}"),
    (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(.+)", lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}"),
    (r"head\.stages\.(.+)", lambda m: f"head.head_series.{m[1]}"),
    (r"mask_codec\.components", lambda m: "mask_encoding.components"),
    (r"mask_codec\.explained_variance", lambda m: "mask_encoding.explained_variances"),
    (r"mask_codec\.mean", lambda m: "mask_encoding.means"),
    (r"(init_proposal_boxes|pos_embeddings)\.weight", lambda m: m[0]),
]


def to_official(state: dict) -> dict:
    official = {}
    for key, value in state.items():
        if key.startswith("criterion.") or NOT_IN_OFFICIAL.fullmatch(key):
            continue  # aliases of mask_codec, and what the official layout lacks
        name = next(f(m) for p, f in INVERSE if (m := re.fullmatch(p, key)))
        official[name] = value.clone()
    return official


@pytest.fixture
def source_model():
    torch.manual_seed(0)
    cfg = build_config("tiny", ["model.head.num_heads=8", "model.num_classes=3"])  # official: 8 heads
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # a "fitted" codec, so that its buffers must really be carried over
        model.mask_codec.mean.normal_()
        model.mask_codec.explained_variance.uniform_(0.5, 2.0)
        for p in model.backbone.body.parameters():  # non-trivial weights everywhere
            p.normal_(0, 0.05)
        for name, buf in model.backbone.body.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model


def test_rules_follow_the_documented_layout():
    assert official_to_ours("backbone.bottom_up.stem.conv1.norm.running_mean") == "backbone.body.bn1.running_mean"
    assert official_to_ours("backbone.bottom_up.res3.0.shortcut.norm.running_var") == "backbone.body.layer2.0.downsample.1.running_var"
    assert official_to_ours("backbone.bottom_up.res5.2.conv3.weight") == "backbone.body.layer4.2.conv3.weight"
    assert official_to_ours("backbone.bottom_up.res2.1.conv2.norm.bias") == "backbone.body.layer1.1.bn2.bias"
    assert official_to_ours("backbone.fpn_lateral5.weight") == "backbone.fpn.inner_blocks.3.0.weight"
    assert official_to_ours("backbone.fpn_output2.bias") == "backbone.fpn.layer_blocks.0.0.bias"
    assert official_to_ours("head.head_series.5.inst_interact.norm3.weight") == "head.stages.5.inst_interact.norm3.weight"
    assert official_to_ours("head.head_series.0.norm3.weight") == "head.stages.0.norm3.weight"  # kept apart
    assert official_to_ours("mask_encoding.explained_variances") == "mask_codec.explained_variance"
    assert official_to_ours("backbone.bottom_up.fc.weight") is None


def test_round_trip_gives_identical_outputs(source_model, tmp_path):
    official_path, out_path = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"model": to_official(source_model.state_dict()), "iteration": 7}, official_path)
    assert main([str(official_path), str(out_path), "--components", "16"]) == 0

    converted = torch.load(out_path, weights_only=False)
    cfg = from_dict(converted["config"])
    assert (cfg.model.backbone.name, cfg.model.head.num_stages, cfg.model.head.num_proposals) == ("resnet18", 2, 10)
    assert (cfg.model.num_classes, cfg.model.mask.components, cfg.model.head.hidden_dim) == (3, 16, 32)
    model = build_model(cfg.model).eval()
    model.load_state_dict(converted["model"])
    torch.testing.assert_close(model.criterion.codec.mean, source_model.mask_codec.mean, rtol=0, atol=0)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1)) * 255
    with torch.inference_mode():
        expected, got = source_model([image])[0], model([image])[0]
    assert len(expected["scores"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(expected[key], got[key]), key


def test_unmapped_and_missing_keys_are_listed_and_nothing_is_written(source_model, tmp_path, capsys):
    official = to_official(source_model.state_dict())
    del official["head.head_series.1.bboxes_delta.bias"]
    official["head.extra_branch.weight"] = torch.zeros(1)
    path, out = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"model": official}, path)
    assert main([str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 unmapped official keys: head.extra_branch.weight" in err
    assert "1 of our keys missing: head.stages.1.bboxes_delta.bias" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_bad_inputs_fail_with_one_line(source_model, tmp_path, capsys):
    path = tmp_path / "official.pth"
    torch.save({"model": to_official(source_model.state_dict())}, path)
    assert main([str(path), str(tmp_path / "o.pth"), "--components", "60"]) == 2
    assert "--components 60 does not match" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "list.pth")
    assert main([str(tmp_path / "list.pth"), str(tmp_path / "o.pth")]) == 2
    assert "expected a dict holding 'model'" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.pth"), str(tmp_path / "o.pth")]) == 2
    assert "absent.pth: file not found" in capsys.readouterr().err
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "garbage.pth"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'garbage.pth'}: cannot read") and "weights_only" not in err
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}}, tmp_path / "foreign.pth")
    assert main([str(tmp_path / "foreign.pth"), str(tmp_path / "o.pth")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'foreign.pth'}: cannot tell the ResNet depth")
    assert not (tmp_path / "o.pth").exists()
