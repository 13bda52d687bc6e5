"""Set criterion: perfect predictions, normalisation, switches, degenerate boxes, GT mask crops."""
import math

import pytest
import torch

from istr.config import LossConfig, MaskConfig, MatcherConfig
from istr.models.criterion import SetCriterion, crop_masks
from istr.models.mask_coding import MaskCodec, soften
from istr.models.matcher import HungarianMatcher

H, W, C, P = 40, 60, 3, 5


def make_targets():
    boxes = torch.tensor([[4.0, 6.0, 24.0, 30.0], [30.0, 2.0, 58.0, 20.0]])
    masks = torch.zeros(2, H, W, dtype=torch.uint8)
    masks[0, 6:30, 4:24] = 1  # fills its box
    masks[1, 2:20, 30:44] = 1  # left half of its box
    return [{"boxes": boxes, "labels": torch.tensor([2, 0]), "masks": masks},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W, dtype=torch.uint8)}]


def make_criterion(mask_loss="l2+dice", r=1e-4, codec=None, deep_supervision=True):
    codec = codec or MaskCodec.identity(28)
    mask_cfg = MaskConfig(representation="raw", soft_r_min=r, soft_r_max=r)
    matcher = HungarianMatcher(MatcherConfig(), codec)
    return SetCriterion(LossConfig(mask_loss=mask_loss, deep_supervision=deep_supervision), mask_cfg, matcher, codec, C)


def perfect_outputs(criterion, targets):
    """Proposals 3 and 1 of image 0 are exactly the two GT instances; everything else is confident background."""
    prepared = criterion.prepare_targets(targets, [(H, W), (H, W)])
    logits = torch.full((2, P, C), -12.0)
    boxes = torch.tensor([[1.0, 1.0, 8.0, 8.0]]).repeat(2, P, 1)
    emb = torch.zeros(2, P, criterion.codec.dim)
    for proposal, gt in ((3, 0), (1, 1)):
        logits[0, proposal, prepared[0]["labels"][gt]] = 12.0
        boxes[0, proposal] = prepared[0]["boxes"][gt]
        emb[0, proposal] = criterion.codec.encode(soften(prepared[0]["masks"][gt:gt + 1], 1e-4, 1e-4))[0]
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": emb}


def test_crop_masks_inside_boxes():
    t = make_targets()[0]
    crops = crop_masks(t["masks"], t["boxes"], 28)
    assert crops.shape == (2, 28, 28)
    assert crops[0].mean().item() == 1.0
    assert crops[1, :, :13].mean().item() == 1.0 and crops[1, :, 15:].sum().item() == 0.0


def test_perfect_prediction_gives_near_zero_losses():
    criterion = make_criterion()
    targets = make_targets()
    losses = criterion([perfect_outputs(criterion, targets)] * 2, targets, [(H, W), (H, W)])
    assert set(losses) == {f"{k}_s{s}" for k in ("loss_class", "loss_l1", "loss_giou", "loss_mask_l2", "loss_dice") for s in (1, 2)}
    for name, value in losses.items():
        assert value.item() < 1e-3, (name, value.item())


def test_wrong_prediction_gives_large_losses():
    criterion = make_criterion()
    targets = make_targets()
    outputs = perfect_outputs(criterion, targets)
    outputs["pred_masks"] = -outputs["pred_masks"]  # inverted masks
    outputs["pred_boxes"][0, 3] += 10.0
    losses = criterion([outputs], targets, [(H, W), (H, W)])
    assert losses["loss_dice_s1"].item() > 2 * 0.9 * 2 / 2  # weight 2 x (~1 per instance), two instances / 2 boxes
    assert math.isclose(losses["loss_l1_s1"].item(), 5 * (10 / 60 * 2 + 10 / 40 * 2) / 2, rel_tol=1e-5)


def test_normalised_by_number_of_boxes():
    criterion = make_criterion(r=0.03)
    targets = make_targets()
    outputs = perfect_outputs(criterion, targets)
    outputs["pred_boxes"] = outputs["pred_boxes"] + 1.5
    single = criterion([outputs], targets, [(H, W), (H, W)])
    doubled_targets = targets + targets
    doubled_outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    double = criterion([doubled_outputs], doubled_targets, [(H, W)] * 4)
    for key in ("loss_class_s1", "loss_l1_s1", "loss_giou_s1", "loss_dice_s1"):
        assert math.isclose(single[key].item(), double[key].item(), rel_tol=1e-5), key


def test_no_instances_normalises_by_one():
    criterion = make_criterion()
    empty = [make_targets()[1]] * 2
    logits = torch.zeros(2, P, C)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(2, P, 4) * 10, "pred_masks": torch.zeros(2, P, 784)}
    losses = criterion([outputs], empty, [(H, W), (H, W)])
    # every score is 0.5 and a negative: (1 - alpha) * 0.5^2 * log 2 each, times weight 2, divided by 1
    expected = 2 * 2 * P * C * 0.75 * 0.25 * math.log(2)
    assert math.isclose(losses["loss_class_s1"].item(), expected, rel_tol=1e-5)
    assert losses["loss_l1_s1"].item() == 0.0 and losses["loss_dice_s1"].item() == 0.0


def test_distributed_box_count_is_averaged(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(6.0))  # the other worker holds 6 boxes
    assert SetCriterion._num_boxes(make_targets(), torch.device("cpu")) == (2 + 6) / 2


@pytest.mark.parametrize("mask_loss,keys", [("dice", {"loss_dice"}), ("l2", {"loss_mask_l2"}),
                                            ("l2+dice", {"loss_dice", "loss_mask_l2"})])
def test_mask_loss_switch(mask_loss, keys):
    criterion = make_criterion(mask_loss, deep_supervision=False)
    targets = make_targets()
    outputs = perfect_outputs(criterion, targets)
    losses = criterion([outputs, outputs, outputs], targets, [(H, W), (H, W)])
    assert set(losses) == {f"{k}_s3" for k in keys | {"loss_class", "loss_l1", "loss_giou"}}


def test_degenerate_predicted_boxes_do_not_crash():
    criterion = make_criterion()
    targets = make_targets()
    outputs = perfect_outputs(criterion, targets)
    boxes = outputs["pred_boxes"].clone()
    boxes[0, 3] = torch.tensor([24.0, 30.0, 4.0, 6.0])  # inverted
    boxes[0, 1] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # empty
    boxes.requires_grad_(True)
    losses = criterion([{**outputs, "pred_boxes": boxes}], targets, [(H, W), (H, W)])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(boxes.grad).all()
