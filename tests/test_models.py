"""The detector: outputs for every ablation, gradients, freezing, weights, pooler levels, parameter count."""

import pytest
import torch
import torchvision
from torchvision.ops import roi_align

from istr.config import BackboneConfig, build_config
from istr.models import build_model
from istr.models.backbone import Backbone
from istr.models.istr import grid_boxes
from istr.models.pooler import MultiScalePooler, assign_levels

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**overrides):
    cfg = build_config("tiny", {"model.num_classes": NUM_CLASSES, **overrides}).model
    torch.manual_seed(0)
    return build_model(cfg)


def images_and_targets():
    images = [torch.rand(3, 64, 96) * 255, torch.rand(3, 50, 70) * 255]
    masks = torch.zeros(2, 64, 96, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 35:60, 50:90] = 1
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [50.0, 35.0, 90.0, 60.0]]), "labels": torch.tensor([0, 2]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 50, 70, dtype=torch.uint8)},
    ]
    return images, targets


ABLATIONS = [
    {},
    {"model.mask.representation": "raw"},
    {"model.mask.components": 40}, {"model.mask.components": 784},
    {"model.matcher.mask_cost": "none"}, {"model.matcher.mask_cost": "dice"}, {"model.matcher.mask_cost": "l1"},
    {"model.loss.mask_loss": "dice"}, {"model.loss.mask_loss": "l2"},
    {"model.head.interaction": "multihead"},
    {"model.head.init_features": "max"}, {"model.head.init_features": "avg"}, {"model.head.init_features": "pos"},
    {"model.head.proposal_init": "image"},
]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k.split('.')[-1]}={v}" for k, v in o.items()) or "default")
def test_train_and_eval_outputs_for_every_ablation(overrides):
    model = tiny_model(**overrides)
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    cfg = model.cfg
    per_stage = {"loss_class", "loss_l1", "loss_giou"} | {
        "dice": {"loss_dice"}, "l2": {"loss_mask_l2"}, "l2+dice": {"loss_dice", "loss_mask_l2"}}[cfg.loss.mask_loss]
    assert set(losses) == {f"{k}_s{s}" for k in per_stage for s in range(1, cfg.head.num_stages + 1)}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, image in zip(detections, images):
        k = det["boxes"].shape[0]
        assert 0 < k <= min(100, cfg.head.num_proposals * NUM_CLASSES)
        assert det["boxes"].dtype == torch.float32 and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (k,) and det["labels"].max() < NUM_CLASSES
        assert det["masks"].shape == (k, 1, *image.shape[-2:]) and det["masks"].dtype == torch.float32
        assert 0 <= det["masks"].min() and det["masks"].max() <= 1
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        h, w = image.shape[-2:]
        assert det["boxes"][:, 0::2].max() <= w and det["boxes"][:, 1::2].max() <= h


def test_all_stages_and_output_sizes():
    model = tiny_model().eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        per_stage = model(images, all_stages=True, output_sizes=[(128, 192), (25, 35)])
        last = model(images)
    assert len(per_stage) == model.cfg.head.num_stages
    assert per_stage[-1][1]["masks"].shape[-2:] == (25, 35)
    # the scaled boxes of the last stage are the unscaled ones times the size ratio (before clipping)
    scaled, plain = per_stage[-1][0], last[0]
    assert torch.equal(scaled["scores"][:5], plain["scores"][:5])
    assert torch.allclose(scaled["boxes"][:5], plain["boxes"][:5] * 2, atol=1e-4)


def test_top_k_is_over_flattened_scores_without_nms():
    model = tiny_model(**{"model.detections_per_image": 7}).eval()
    logits = torch.randn(1, model.cfg.head.num_proposals, NUM_CLASSES)
    boxes = torch.tensor([[2.0, 2.0, 30.0, 30.0]]).repeat(1, model.cfg.head.num_proposals, 1)
    out = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": torch.zeros(1, model.cfg.head.num_proposals, 16)}
    det = model.postprocess(out, [(40, 40)], [(40, 40)])[0]
    expected = logits.sigmoid().flatten().topk(7)
    assert torch.allclose(det["scores"], expected.values)
    assert torch.equal(det["labels"], expected.indices % NUM_CLASSES)  # identical boxes: nothing suppressed


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    model = tiny_model(**{"model.backbone.freeze_at": 2})
    images, targets = images_and_targets()
    model.train()
    sum(model(images, targets).values()).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in frozen)
    assert not any(n.startswith("backbone.body.layer2") for n in frozen)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert model.init_proposal_boxes.weight.grad.abs().sum() > 0  # learns through stage 1


@pytest.mark.parametrize("freeze_at,first_trainable", [(0, "conv1"), (1, "layer1"), (3, "layer3"), (5, None)])
def test_freeze_at_semantics(freeze_at, first_trainable):
    backbone = Backbone(BackboneConfig(name="resnet18", freeze_at=freeze_at, norm="bn", fpn_channels=8))
    trainable = [n for n, p in backbone.body.named_parameters() if p.requires_grad]
    assert (trainable[0].split(".")[0] if trainable else None) == first_trainable
    frozen_norms = [m for m in backbone.body.modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)]
    assert (len(frozen_norms) > 0) == (freeze_at > 0)


def test_backbone_weights_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(reference.layer3[0].conv1.weight)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone(BackboneConfig(name="resnet18", weights=str(path), fpn_channels=8))
    assert torch.equal(backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert torch.equal(backbone.body.bn1.running_var, reference.bn1.running_var)
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("layer4.1")} | {"extra.w": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"missing keys \['layer4\.1\..*unexpected keys \['extra\.w'\]"):
        Backbone(BackboneConfig(name="resnet18", weights=str(bad), fpn_channels=8))


def test_level_assignment_rule():
    sides = torch.tensor([10.0, 111.0, 113.0, 223.0, 225.0, 447.0, 449.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert assign_levels(boxes).tolist() == [2, 2, 3, 3, 4, 4, 5, 5]


def test_pooler_is_aligned_roi_align_on_the_assigned_level():
    torch.manual_seed(0)
    features = [torch.randn(2, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[3.0, 5.0, 30.0, 40.0]]), torch.tensor([[0.0, 0.0, 63.0, 63.0], [10.0, 10.0, 12.0, 12.0]])]
    pooled = MultiScalePooler(7, 2)(features, boxes)
    assert pooled.shape == (3, 4, 7, 7)
    for row, (image, box) in enumerate([(0, boxes[0][0]), (1, boxes[1][0]), (1, boxes[1][1])]):
        level = assign_levels(box[None]).item()
        rois = torch.cat([torch.tensor([float(image)]), box])[None]
        expected = roi_align(features[level - 2], rois, 7, 1 / 2**level, 2, aligned=True)
        assert torch.allclose(pooled[row], expected[0]), row


def test_initial_boxes():
    assert grid_boxes(50).shape == (50, 4)
    cells = grid_boxes(50)
    assert torch.allclose(cells[:, 2], torch.full((50,), 0.1)) and torch.allclose(cells[:, 3], torch.full((50,), 0.2))
    assert torch.allclose(cells[11], torch.tensor([0.15, 0.3, 0.1, 0.2]))  # row 1, col 1 of 10 x 5
    official = tiny_model(**{"model.head.proposal_init": "image"})
    features = [torch.zeros(1, 32, 2, 2)] * 4
    boxes, _ = official.initial_proposals(features, [(50, 70)])
    assert torch.allclose(boxes[0], torch.tensor([[0.0, 0.0, 70.0, 50.0]]).expand(10, 4))


def test_r50_parameter_count_matches_official():
    with torch.device("meta"):
        model = build_model(build_config().model)
    count = sum(p.numel() for p in model.parameters())
    pca_values = 60 * 784 + 60 + 784  # nn.Parameters in the official model, buffers in ours
    assert count + pca_values == 108_411_612
    assert sum(p.numel() for p in model.head.stages[0].parameters()) == 13_581_072


def test_codec_shape_mismatch_is_reported():
    cfg = build_config("tiny").model
    from istr.models.mask_coding import MaskCodec

    with pytest.raises(ValueError, match="mask codec has 20 components"):
        build_model(cfg, MaskCodec.placeholder(20))


@pytest.mark.parametrize("aligned", [True, False])
def test_matmul_roi_align_matches_torchvision_in_value_and_gradient(aligned):
    from istr.models.roi_align_matmul import roi_align_matmul

    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 13, 17, generator=g)
    xy = torch.rand(40, 2, generator=g) * 70 - 8
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), xy, xy + torch.rand(40, 2, generator=g) * 40], 1)
    rois[0, 1:] = torch.tensor([5.0, 5.0, 5.2, 5.1])  # smaller than a cell
    rois[1, 1:] = torch.tensor([-30.0, -30.0, -10.0, -10.0])  # outside the map
    rois[2, 1:] = torch.tensor([60.0, 40.0, 90.0, 70.0])  # across the far edge
    f_tv, f_mm = features.clone().requires_grad_(), features.clone().requires_grad_()
    expected = roi_align(f_tv, rois, 7, 0.25, 2, aligned)
    actual = roi_align_matmul(f_mm, rois, 7, 0.25, 2, aligned)
    assert torch.allclose(actual, expected, atol=1e-5)
    upstream = torch.randn(expected.shape, generator=g)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    assert torch.allclose(f_mm.grad, f_tv.grad, atol=1e-4)
    assert f_tv.grad.abs().max() > 1  # the comparison is not between two zero gradients


def test_matmul_pooler_equals_torchvision_pooler():
    torch.manual_seed(1)
    features = [torch.randn(2, 4, 128 // s, 128 // s) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[3.0, 5.0, 30.0, 40.0], [0.0, 0.0, 127.0, 127.0]]), torch.tensor([[10.0, 20.0, 90.0, 80.0]])]
    expected = MultiScalePooler(7, 2, impl="torchvision")(features, boxes)
    assert torch.allclose(MultiScalePooler(7, 2, impl="matmul")(features, boxes), expected, atol=1e-5)


def _value_and_grads(fn, params, inputs, upstream):
    """fn(*inputs) and the gradients of sum(fn(*inputs) * upstream) with respect to the inputs and params."""
    inputs = [x.clone().requires_grad_() for x in inputs]
    value = fn(*inputs)
    grads = torch.autograd.grad((value * upstream).sum(), inputs + list(params))
    return value.detach(), grads


def test_dynamic_conv_split_product_equals_one_dynamic_layer():
    """The two half-weight products give what one dynamic_layer call split in two gives (value and gradient)."""
    from istr.models.dynamic_conv import DynamicConv

    torch.manual_seed(0)
    conv = DynamicConv(hidden_dim=16, dynamic_dim=4, pooler_resolution=3)

    def one_dynamic_layer(proposal, roi):
        params = conv.dynamic_layer(proposal)
        w1 = params[:, : conv.num_params].view(-1, 16, 4)
        w2 = params[:, conv.num_params :].view(-1, 4, 16)
        x = conv.activation(conv.norm1(roi @ w1))
        x = conv.activation(conv.norm2(x @ w2))
        return conv.activation(conv.norm3(conv.out_layer(x.flatten(1))))

    inputs, upstream = [torch.randn(5, 16), torch.randn(5, 9, 16)], torch.randn(5, 16)
    value, grads = _value_and_grads(conv, conv.parameters(), inputs, upstream)
    expected_value, expected_grads = _value_and_grads(one_dynamic_layer, conv.parameters(), inputs, upstream)
    assert torch.allclose(value, expected_value, atol=1e-6)
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected_grads))
    assert grads[0].abs().max() > 1e-2  # not two zero gradients


def test_stage_attention_on_cpu_equals_the_default_kernel():
    """ISTRStage runs its self-attention with the math kernel on the CPU: same value and gradient as the flash
    kernel, which torch picks on the CPU by default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from istr.models.head import ISTRStage

    cfg = build_config("tiny").model.head
    torch.manual_seed(0)
    stage = ISTRStage(cfg, NUM_CLASSES, mask_dim=16)
    params = list(stage.self_attn.parameters())
    inputs, upstream = [torch.randn(2, 50, cfg.hidden_dim)], torch.randn(2, 50, cfg.hidden_dim)
    value, grads = _value_and_grads(stage._self_attention, params, inputs, upstream)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        expected_value, expected_grads = _value_and_grads(
            lambda x: stage.self_attn(x, x, x, need_weights=False)[0], params, inputs, upstream)
    assert torch.allclose(value, expected_value, atol=1e-5)
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected_grads))
    assert grads[0].abs().max() > 1e-2


@pytest.mark.parametrize("overrides", [{"model.head.init_features": "max"}, {"model.head.init_features": "avg"},
                                       {"model.head.init_features": "pos"}, {"model.head.interaction": "multihead"}],
                         ids=lambda o: ",".join(f"{k.split('.')[-1]}={v}" for k, v in o.items()))
def test_each_head_switch_changes_the_detections(overrides):
    """With every weight the two models share copied from the default, only the switch's own code differs: a
    switch that were silently ignored would give bit-identical detections (CPU inference is deterministic)."""
    images, _ = images_and_targets()
    default = tiny_model().eval()
    switched = tiny_model(**overrides)
    ours = switched.state_dict()
    shared = {k: v for k, v in default.state_dict().items()
              if torch.is_tensor(v) and k in ours and ours[k].shape == v.shape}
    switched.load_state_dict(shared, strict=False)
    switched.eval()
    with torch.no_grad():
        reference, detections = default(images), switched(images)
        again = default(images)
    assert torch.equal(again[0]["scores"], reference[0]["scores"])  # the null: same model, same numbers
    assert not torch.equal(detections[0]["scores"], reference[0]["scores"])
