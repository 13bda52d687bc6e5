"""Hungarian matcher: optimality against brute force, every cost term against hand-computed values."""
import itertools
import math

import pytest
import torch

from istr.config import MatcherConfig
from istr.models.mask_coding import MaskCodec
from istr.models.matcher import (HungarianMatcher, class_cost, cosine_mask_cost, dice_mask_cost, giou_cost,
                                 l1_cost, l1_mask_cost)


def random_boxes(n, g, size=100.0):
    xy = torch.rand(n, 2, generator=g) * size * 0.6
    wh = torch.rand(n, 2, generator=g) * size * 0.4 + 1
    return torch.cat([xy, xy + wh], 1)


def random_case(g, num_pred, num_gt, num_classes=3, dim=5):
    outputs = {"pred_logits": torch.randn(1, num_pred, num_classes, generator=g),
               "pred_boxes": random_boxes(num_pred, g)[None],
               "pred_masks": torch.randn(1, num_pred, dim, generator=g)}
    target = {"labels": torch.randint(0, num_classes, (num_gt,), generator=g), "boxes": random_boxes(num_gt, g),
              "image_size_xyxy": torch.tensor([100.0, 80.0, 100.0, 80.0]),
              "mask_emb": torch.randn(num_gt, dim, generator=g), "masks": (torch.rand(num_gt, 2, 2, generator=g) > 0.5).float()}
    return outputs, target


@pytest.mark.parametrize("mask_cost", ["cosine", "l1", "none", "dice"])
def test_matches_brute_force_optimum(mask_cost):
    g = torch.Generator().manual_seed(0)
    codec = MaskCodec.placeholder(4, resolution=2)  # 2x2 masks, embeddings of length 4
    matcher = HungarianMatcher(MatcherConfig(mask_cost=mask_cost), codec)
    for trial in range(12):
        num_pred, num_gt = [(5, 3), (4, 4), (6, 2), (3, 1)][trial % 4]
        outputs, target = random_case(g, num_pred, num_gt, dim=4)
        (rows, cols), = matcher(outputs, [target])
        cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], outputs["pred_masks"][0], target)
        best = min(sum(cost[p, j].item() for j, p in enumerate(perm))
                   for perm in itertools.permutations(range(num_pred), num_gt))
        assert len(rows) == num_gt and sorted(cols.tolist()) == list(range(num_gt))
        assert len(set(rows.tolist())) == num_gt
        assert math.isclose(cost[rows, cols].sum().item(), best, rel_tol=1e-6, abs_tol=1e-6)


def test_class_cost_hand_computed():
    logit = torch.tensor([[0.0, math.log(3.0)]])  # p = 0.5, 0.75
    labels = torch.tensor([1, 0])
    cost = class_cost(logit, labels, alpha=0.25, gamma=2.0)
    p = 0.75
    expected_1 = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    expected_0 = 0.25 * 0.25 * -math.log(0.5) - 0.75 * 0.25 * -math.log(0.5)
    assert cost.shape == (1, 2)
    assert math.isclose(cost[0, 0].item(), expected_1, rel_tol=1e-5)
    assert math.isclose(cost[0, 1].item(), expected_0, rel_tol=1e-5)


def test_box_costs_hand_computed():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    gt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    assert torch.allclose(l1_cost(pred, gt), torch.tensor([[4.0, 0.0]]))
    # overlap 1, union 7, enclosing 9: GIoU = 1/7 - 2/9
    assert torch.allclose(giou_cost(pred, gt), torch.tensor([[-(1 / 7 - 2 / 9), -1.0]]), atol=1e-6)


def test_giou_cost_survives_degenerate_boxes():
    pred = torch.tensor([[5.0, 5.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])  # inverted, empty
    gt = torch.tensor([[1.0, 1.0, 5.0, 5.0], [3.0, 3.0, 3.0, 3.0]])
    cost = giou_cost(pred, gt)
    assert torch.isfinite(cost).all()
    assert math.isclose(cost[0, 0].item(), -1.0, abs_tol=1e-6)  # inverted box = the GT box once ordered
    assert math.isclose(cost[1, 1].item(), 1.0, abs_tol=1e-6)  # empty vs empty: worst cost


def test_mask_costs_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0]])
    # cos = 0 and 1/sqrt(2): cost = -(cos + 1) / 2
    assert torch.allclose(cosine_mask_cost(a, b), torch.tensor([[-0.5], [-(1 / math.sqrt(2) + 1) / 2]]))
    assert torch.allclose(l1_mask_cost(a, b), torch.tensor([[3.0 / 2], [2.0 / 2]]))
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(dice_mask_cost(p, t), torch.tensor([[1 - 1.0 / (0.5 + 1 + 1e-5)]]))


def test_weights_scale_each_term():
    g = torch.Generator().manual_seed(3)
    outputs, target = random_case(g, 4, 2, dim=4)
    args = (outputs["pred_logits"][0], outputs["pred_boxes"][0], outputs["pred_masks"][0], target)
    only = dict(cost_class=0.0, cost_l1=0.0, cost_giou=0.0, cost_mask=0.0)
    scale = target["image_size_xyxy"]
    terms = {
        "cost_class": class_cost(args[0], target["labels"], 0.25, 2.0),
        "cost_l1": l1_cost(args[1] / scale, target["boxes"] / scale),
        "cost_giou": giou_cost(args[1], target["boxes"]),
        "cost_mask": cosine_mask_cost(args[2], target["mask_emb"]),
    }
    for name, term in terms.items():
        cost = HungarianMatcher(MatcherConfig(**{**only, name: 3.0})).cost_matrix(*args)
        assert torch.allclose(cost, 3.0 * term, atol=1e-6), name


def test_image_without_instances():
    g = torch.Generator().manual_seed(1)
    outputs, target = random_case(g, 4, 0)
    (rows, cols), = HungarianMatcher(MatcherConfig())(outputs, [target])
    assert rows.numel() == 0 and cols.numel() == 0
