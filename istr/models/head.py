"""The ISTR head: one refinement stage and the stack of stages (recurrent box refinement)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from istr.config import HeadConfig
from istr.models.dynamic_conv import DynamicConv, MultiheadRoIAttention


def apply_deltas(deltas: Tensor, boxes: Tensor, weights: Sequence[float], scale_clamp: float) -> Tensor:
    """Box regression decoding: deltas [N, 4] (dx, dy, dw, dh) relative to boxes [N, 4] xyxy -> [N, 4] xyxy."""
    deltas = deltas.float()
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dw = (deltas[:, 2] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3] / wh).clamp(max=scale_clamp)
    pred_ctr_x = deltas[:, 0] / wx * widths + ctr_x
    pred_ctr_y = deltas[:, 1] / wy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=1)


def _tower(dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ELU(inplace=True)]
    return nn.Sequential(*layers)


class ISTRStage(nn.Module):
    """One stage: self-attention -> instance interaction -> FFN -> class / box / mask towers.

    forward(proposal [B, P, d], roi [B*P, S*S, d], boxes [B*P, 4] xyxy)
        -> logits [B, P, C], boxes [B, P, 4] xyxy (input pixels), mask embeddings [B, P, l], proposal [B, P, d]
    """

    def __init__(self, cfg: HeadConfig, num_classes: int, mask_dim: int):
        super().__init__()
        d = cfg.hidden_dim
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=0.0, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        if cfg.interaction == "dynamic":
            self.inst_interact: nn.Module = DynamicConv(d, cfg.dynamic_dim, cfg.pooler_resolution)
        else:
            self.inst_interact = MultiheadRoIAttention(d, cfg.num_heads, cfg.pooler_resolution)
        self.norm2 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.activation = nn.ELU(inplace=True)
        self.norm3 = nn.LayerNorm(d)
        self.cls_module = _tower(d, cfg.num_cls_layers)
        self.reg_module = _tower(d, cfg.num_reg_layers)
        self.mask_module = _tower(d, cfg.num_mask_layers)
        self.class_logits = nn.Linear(d, num_classes)
        self.bboxes_delta = nn.Linear(d, 4)
        self.mask_logits = nn.Linear(d, mask_dim)
        self.bbox_weights = tuple(cfg.bbox_weights)
        self.scale_clamp = cfg.scale_clamp

    def forward(self, proposal: Tensor, roi: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, p, d = proposal.shape
        proposal = self.norm1(proposal + self._self_attention(proposal))
        flat = proposal.reshape(b * p, d)
        flat = self.norm2(flat + self.inst_interact(flat, roi))
        flat = self.norm3(flat + self.linear2(self.activation(self.linear1(flat))))
        logits = self.class_logits(self.cls_module(flat))
        deltas = self.bboxes_delta(self.reg_module(flat))
        masks = self.mask_logits(self.mask_module(flat))
        pred_boxes = apply_deltas(deltas, boxes, self.bbox_weights, self.scale_clamp)
        return logits.view(b, p, -1), pred_boxes.view(b, p, 4), masks.view(b, p, -1), flat.view(b, p, d)

    def _self_attention(self, proposal: Tensor) -> Tensor:
        # On the CPU the flash kernel's backward is slow for this attention (50 tokens: 4% of a smoke step); the math
        # kernel computes the same. Only here: for MultiheadRoIAttention (1 query, 49 keys) flash is the faster one.
        on_cpu = proposal.device.type == "cpu"
        with sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext():
            return self.self_attn(proposal, proposal, proposal, need_weights=False)[0]


class ISTRHead(nn.Module):
    """The stack of ``num_stages`` stages (no weight sharing); ``stages[k]`` is stage k + 1.

    forward(features [p2..p5], boxes [B, P, 4] xyxy, proposal [B, P, d], pooler) -> list over stages of dicts
    ``pred_logits [B, P, C]``, ``pred_boxes [B, P, 4]``, ``pred_masks [B, P, l]`` (mask embeddings).
    Each stage pools with its own input boxes; boxes are detached between stages, features are not.
    """

    def __init__(self, cfg: HeadConfig, num_classes: int, mask_dim: int):
        super().__init__()
        self.stages = nn.ModuleList(ISTRStage(cfg, num_classes, mask_dim) for _ in range(cfg.num_stages))
        self._reset_parameters(cfg.prior_prob)

    def _reset_parameters(self, prior_prob: float) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        bias = -math.log((1 - prior_prob) / prior_prob)
        for stage in self.stages:
            nn.init.constant_(stage.class_logits.bias, bias)

    def forward(self, features: Sequence[Tensor], boxes: Tensor, proposal: Tensor,
                pooler: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]) -> list[dict[str, Tensor]]:
        b, p, d = proposal.shape
        outputs = []
        for stage in self.stages:
            roi = pooler(features, list(boxes))  # [B*P, d, S, S]
            roi = roi.flatten(2).transpose(1, 2)  # [B*P, S*S, d], cell = y * S + x
            logits, pred_boxes, masks, proposal = stage(proposal, roi, boxes.reshape(b * p, 4))
            outputs.append({"pred_logits": logits, "pred_boxes": pred_boxes, "pred_masks": masks})
            boxes = pred_boxes.detach()
        return outputs
