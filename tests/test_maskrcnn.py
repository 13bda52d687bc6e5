"""The Mask R-CNN baseline speaks ISTR's model interface (docs/design.md "Model")."""
from __future__ import annotations

import pytest
import torch

from baselines.maskrcnn import NormalizeOnlyTransform, build_maskrcnn
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
