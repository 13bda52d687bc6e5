"""The ISTR detector: backbone + FPN, learned proposals, the stage stack, losses in training, detections in eval."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from istr.config import ModelConfig
from istr.models.backbone import FEATURE_STRIDES, Backbone
from istr.models.criterion import SetCriterion
from istr.models.head import ISTRHead
from istr.models.mask_coding import MaskCodec
from istr.models.matcher import HungarianMatcher
from istr.models.paste import paste_masks
from istr.models.pooler import MultiScalePooler


def grid_boxes(num_proposals: int) -> Tensor:
    """Normalised cxcywh boxes [P, 4] tiling the image ("grid" proposal start, a CPU-scale deviation).

    rows = max(1, round(sqrt(P / 2))), cols = ceil(P / rows) (twice as many columns as rows: 50 -> 10 x 5,
    300 -> 25 x 12); proposal i takes cell (row i // cols, col i % cols) and its box is exactly that cell:
    cx = (col + 0.5) / cols, cy = (row + 0.5) / rows, w = 1 / cols, h = 1 / rows. When rows * cols > P the
    last row is only partly filled.
    """
    rows = max(1, round(math.sqrt(num_proposals / 2)))
    cols = math.ceil(num_proposals / rows)
    i = torch.arange(num_proposals, dtype=torch.float32)
    row, col = torch.div(i, cols, rounding_mode="floor"), i % cols
    return torch.stack([(col + 0.5) / cols, (row + 0.5) / rows,
                        torch.full_like(i, 1.0 / cols), torch.full_like(i, 1.0 / rows)], dim=1)


class ISTR(nn.Module):
    """ISTR (Hu et al., CVPR 2021). See docs/design.md for the call conventions.

    Module names: backbone (.body, .fpn), pooler, head (.stages[k]), init_proposal_boxes, pos_embeddings
    (None unless init_features uses "pos"), mask_codec, criterion (.matcher).
    """

    def __init__(self, cfg: ModelConfig, mask_codec: MaskCodec):
        super().__init__()
        self.cfg = cfg
        h = cfg.head
        self.backbone = Backbone(cfg.backbone)
        self.pooler = MultiScalePooler(h.pooler_resolution, h.sampling_ratio, FEATURE_STRIDES,
                                       h.pooler_impl)
        self.mask_codec = mask_codec
        self.head = ISTRHead(h, cfg.num_classes, mask_codec.dim)
        self.init_proposal_boxes = nn.Embedding(h.num_proposals, 4)
        with torch.no_grad():
            if h.proposal_init == "grid":
                self.init_proposal_boxes.weight.copy_(grid_boxes(h.num_proposals))
            else:  # official: every box is the whole image
                self.init_proposal_boxes.weight[:, :2] = 0.5
                self.init_proposal_boxes.weight[:, 2:] = 1.0
        self.pos_embeddings = nn.Embedding(h.num_proposals, h.hidden_dim) if "pos" in h.init_features else None
        matcher = HungarianMatcher(cfg.matcher, mask_codec)
        self.criterion = SetCriterion(cfg.loss, cfg.mask, matcher, mask_codec, cfg.num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

    # -- pieces ------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad to a multiple of size_divisibility -> [B, 3, H, W], un-padded sizes [(h, w)]."""
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        div = self.cfg.size_divisibility
        height = math.ceil(max(s[0] for s in sizes) / div) * div
        width = math.ceil(max(s[1] for s in sizes) / div) * div
        batch = images[0].new_zeros(len(images), 3, height, width, dtype=torch.float32)
        for i, img in enumerate(images):
            batch[i, :, : sizes[i][0], : sizes[i][1]] = (img.float() - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def initial_proposals(self, features: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Initial boxes [B, P, 4] xyxy in each image's own pixels, and proposal features [B, P, d]."""
        scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32, device=features[0].device)
        boxes = box_convert(self.init_proposal_boxes.weight, "cxcywh", "xyxy")[None] * scale[:, None]
        mode = self.cfg.head.init_features
        num_proposals, batch = self.init_proposal_boxes.num_embeddings, len(sizes)
        if mode in ("avg", "avg+pos"):
            image_feature = sum(f.mean(dim=(2, 3)) for f in features)  # over the padded maps, as the official code
        elif mode == "max":
            image_feature = sum(f.amax(dim=(2, 3)) for f in features)
        else:
            image_feature = features[0].new_zeros(batch, features[0].shape[1])
        proposal = image_feature[:, None, :].expand(batch, num_proposals, -1)
        if self.pos_embeddings is not None:
            proposal = proposal + self.pos_embeddings.weight[None]
        return boxes, proposal.contiguous()

    def stage_outputs(self, images: Sequence[Tensor]) -> tuple[list[dict[str, Tensor]], list[tuple[int, int]]]:
        """The raw outputs of every stage (``pred_logits [B, P, C]``, ``pred_boxes [B, P, 4]`` xyxy in the padded
        batch's pixels, ``pred_masks [B, P, l]`` embeddings) and the un-padded image sizes."""
        batch, sizes = self.preprocess(images)
        pyramid = self.backbone(batch)
        features = [pyramid[k] for k in ("p2", "p3", "p4", "p5")]
        boxes, proposal = self.initial_proposals(features, sizes)
        return self.head(features, boxes, proposal, self.pooler), sizes

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict[str, Tensor]]] = None,
                all_stages: bool = False, output_sizes: Optional[Sequence[tuple[int, int]]] = None):
        if self.training and targets is None:
            raise ValueError("ISTR: targets are required in training mode")
        stage_outputs, sizes = self.stage_outputs(images)
        if self.training:
            return self.criterion(stage_outputs, targets, sizes)
        out_sizes = list(output_sizes) if output_sizes is not None else sizes
        if all_stages:
            return [self.postprocess(o, sizes, out_sizes) for o in stage_outputs]
        return self.postprocess(stage_outputs[-1], sizes, out_sizes)

    @torch.no_grad()
    def postprocess(self, outputs: dict[str, Tensor], sizes: Sequence[tuple[int, int]],
                    out_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Top-k (score, class) pairs over the flattened P x C sigmoid scores, no NMS; masks pasted into the image."""
        results = []
        num_classes = outputs["pred_logits"].shape[-1]
        for logits, boxes, emb, (h, w), (out_h, out_w) in zip(
                outputs["pred_logits"], outputs["pred_boxes"], outputs["pred_masks"], sizes, out_sizes):
            scores, flat = logits.float().sigmoid().flatten().topk(min(self.cfg.detections_per_image, logits.numel()))
            labels, proposal = flat % num_classes, torch.div(flat, num_classes, rounding_mode="floor")
            boxes = boxes[proposal].float() * boxes.new_tensor([out_w / w, out_h / h, out_w / w, out_h / h])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, labels, proposal = boxes[keep], scores[keep], labels[keep], proposal[keep]
            masks = paste_masks(self.mask_codec.decode(emb[proposal]), boxes, (out_h, out_w))  # [K, 1, H, W]
            results.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks})
        return results

