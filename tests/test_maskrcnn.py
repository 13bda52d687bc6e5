"""The Mask R-CNN baseline speaks ISTR's model interface (docs/design.md "Model")."""
from __future__ import annotations

import pytest
import torch

from torchvision.ops import MultiScaleRoIAlign

from baselines.maskrcnn import MatmulMultiScaleRoIAlign, NormalizeOnlyTransform, build_maskrcnn
from istr.config import build_config

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(*overrides):
    return build_config("tiny", [f"model.num_classes={NUM_CLASSES}", *overrides]).model


def sample_batch():
    """Two images of different sizes, the second without annotations."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 60, 90, generator=g) * 255]
    masks = torch.zeros(2, 64, 96, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 30:60, 50:90] = 1
    images[0][:, masks[0].bool()] = 255.0  # two visible objects: one bright, one dark
    images[0][:, masks[1].bool()] = 0.0
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 40, 30], [50, 30, 90, 60]]), "labels": torch.tensor([0, 2]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 60, 90, dtype=torch.uint8)},
    ]
    return images, targets


def test_training_returns_finite_losses_and_respects_freeze_at():
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_cfg("model.backbone.freeze_at=2"), anchor_scale=64 / 800).train()
    images, targets = sample_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body
    assert all(p.grad is None for p in body.layer1.parameters())  # res2 frozen
    assert all(not p.requires_grad for p in body.conv1.parameters())  # stem frozen
    assert body.layer2[0].conv1.weight.grad is not None and body.layer2[0].conv1.weight.grad.abs().sum() > 0


def test_a_few_steps_reduce_the_loss_on_one_batch():
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_cfg(), anchor_scale=64 / 800).train()
    images, targets = sample_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], history


def test_inference_format_labels_masks_and_output_sizes():
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_cfg("model.detections_per_image=20"), score_thresh=0.0, anchor_scale=64 / 800).eval()
    images, _ = sample_batch()
    with torch.inference_mode():
        dets = model(images)
        stages = model(images, all_stages=True)
        doubled = model(images, output_sizes=[(128, 192), (120, 180)])
    assert len(dets) == 2 and len(stages) == 1 and len(stages[0]) == 2
    for det, img in zip(dets, images):
        k = det["boxes"].shape[0]
        assert k == 20  # score_thresh 0 keeps detections_per_image
        assert det["labels"].dtype == torch.int64 and 0 <= det["labels"].min() and det["labels"].max() < NUM_CLASSES
        assert det["masks"].shape == (k, 1, *img.shape[-2:])
        assert 0.0 <= det["masks"].min() and det["masks"].max() <= 1.0
        assert det["scores"].shape == (k,)
    torch.testing.assert_close(stages[0][0]["boxes"], dets[0]["boxes"])
    torch.testing.assert_close(doubled[0]["boxes"], dets[0]["boxes"] * 2, rtol=1e-5, atol=1e-3)
    assert doubled[1]["masks"].shape[-2:] == (120, 180)


def test_default_score_threshold_filters_and_transform_only_normalises():
    cfg = tiny_cfg()
    model = build_maskrcnn(cfg).eval()
    assert model.roi_heads.score_thresh == pytest.approx(0.05)
    assert isinstance(model.transform, NormalizeOnlyTransform)
    image = torch.full((3, 50, 70), 200.0)
    batch, _ = model.transform([image])
    assert batch.image_sizes == [(50, 70)]  # no resize
    assert batch.tensors.shape[-2:] == (64, 96)  # padded to a multiple of 32
    expected = (200.0 - torch.tensor(cfg.pixel_mean)) / torch.tensor(cfg.pixel_std)
    torch.testing.assert_close(batch.tensors[0, :, 0, 0], expected)


def test_anchor_sizes_follow_the_test_resolution():
    model = build_maskrcnn(tiny_cfg(), anchor_scale=0.25)
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert model.backbone.out_channels == 32  # cfg.backbone.fpn_channels of the tiny preset


def test_runner_trains_evaluates_writes_the_job_files_and_resumes(tmp_path):
    from baselines.maskrcnn import train_and_evaluate

    cfg = build_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "solver.max_iter=2", "solver.steps=[1]",
                                "solver.checkpoint_period=2", "data.max_val_images=2"])
    out = tmp_path / "job"
    metrics = train_and_evaluate(cfg, out)
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "detections.json", "metrics.json", "checkpoints/last.pth"):
        assert (out / name).is_file(), name
    assert metrics["iterations"] == 2 and metrics["num_val_images"] == 2
    assert set(metrics["stages"]) == {"1"} and metrics["final"] == metrics["stages"]["1"]
    assert 0.0 <= metrics["final"]["mask_AP"] <= 100.0 and metrics["train_time_s"] > 0
    (out / "checkpoints" / "last.pth").unlink()  # a finished job is not retrained
    assert train_and_evaluate(cfg, out) == metrics


@pytest.mark.parametrize("size", [7, 14])
def test_matmul_pooler_equals_torchvisions_multiscale_roi_align_in_value_and_gradient(size):
    """Same level rule and aligned=False as torchvision's pooler; boxes chosen to land on all four levels."""
    g = torch.Generator().manual_seed(1)
    shapes = {"p2": 128, "p3": 64, "p4": 32, "p5": 16}  # a 512 x 512 image
    features = {k: torch.randn(2, 4, n, n, generator=g) for k, n in shapes.items()}
    sides = torch.tensor([20.0, 60, 150, 300, 33, 505])  # sqrt(area) ~ 0.95 * side: levels 2, 2, 3, 4, 2, 5
    boxes = [torch.stack([torch.full_like(sides, 3), torch.full_like(sides, 2), sides, sides * 0.9], 1), torch.tensor([[5.0, 7, 100, 90]])]
    outputs, grads = [], []
    for pooler_class in (MultiScaleRoIAlign, MatmulMultiScaleRoIAlign):
        inputs = {k: v.clone().requires_grad_(True) for k, v in features.items()}
        pooler = pooler_class(list(shapes), output_size=size, sampling_ratio=2)
        out = pooler(inputs, boxes, [(512, 512), (512, 512)])
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append(torch.cat([inputs[k].grad.flatten() for k in shapes]))
    levels = MultiScaleRoIAlign(list(shapes), size, 2)
    levels(features, boxes, [(512, 512)] * 2)
    assert set(levels.map_levels(boxes).tolist()) == {0, 1, 2, 3}
    assert outputs[0].shape == outputs[1].shape == (7, 4, size, size)
    assert torch.allclose(outputs[1], outputs[0], atol=2e-5)
    assert torch.allclose(grads[1], grads[0], atol=1e-4)


def test_smoke_preset_pools_both_detectors_with_the_matmul_roi_align():
    model = build_maskrcnn(build_config("smoke", ["model.num_classes=5"]).model, anchor_scale=128 / 800)
    assert isinstance(model.roi_heads.box_roi_pool, MatmulMultiScaleRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, MatmulMultiScaleRoIAlign)
    assert type(build_maskrcnn(tiny_cfg()).roi_heads.box_roi_pool) is MultiScaleRoIAlign
