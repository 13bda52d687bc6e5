"""Pasting R x R mask probabilities into the image in continuous box coordinates (the official ISTR's paste).

Why not torchvision's ``paste_masks_in_image``: it rounds the box to whole pixels and adds one pixel on the right
and bottom, the convention of Mask R-CNN's targets (RoIAlign aligned=False). ISTR's targets are RoIAlign
aligned=True crops, whose R x R cells span the box exactly; pasting them back the torchvision way costs ~5 mask AP
on perfect detections of the synthetic data (reports/mask_ceiling.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], max_samples: int = 1 << 22) -> Tensor:
    """masks [K, R, R] probabilities, boxes [K, 4] xyxy pixels, image_size (H, W) -> [K, 1, H, W].

    Pixel (x, y) has its centre at (x + 0.5, y + 0.5) and takes the bilinear sample of its mask at that point,
    the mask's cells tiling the box (``grid_sample``, align_corners=False, zeros outside the mask, so values
    fade over the outer half cell). Only pixels inside each box's integer extent are sampled; the rest are 0.

    All boxes are sampled by one ``grid_sample`` per chunk of similar extents (at most ``max_samples`` grid
    points, padding included), each on its own extent, so the values are those of sampling box by box.
    """
    height, width = image_size
    out = masks.new_zeros((len(masks), 1, height, width))
    x0, y0, x1, y1 = boxes.to(masks.dtype).unbind(1)
    left, top = x0.floor().clamp(min=0).long(), y0.floor().clamp(min=0).long()
    widths = (x1.ceil().clamp(max=width).long() - left).clamp(min=0)
    heights = (y1.ceil().clamp(max=height).long() - top).clamp(min=0)
    flat_out = out.view(-1)
    for chunk in _chunks_of_similar_extent(widths.tolist(), heights.tolist(), max_samples):
        chunk = torch.tensor(chunk, device=masks.device)
        w_max, h_max = int(widths[chunk].max()), int(heights[chunk].max())
        cols = left[chunk, None] + torch.arange(w_max, device=masks.device)  # [n, w] pixel columns
        rows = top[chunk, None] + torch.arange(h_max, device=masks.device)  # [n, h] pixel rows
        xs = (cols.to(masks.dtype) + 0.5 - x0[chunk, None]) / (x1 - x0)[chunk, None] * 2 - 1
        ys = (rows.to(masks.dtype) + 0.5 - y0[chunk, None]) / (y1 - y0)[chunk, None] * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # [n, h, w, (x, y)]
        sampled = F.grid_sample(masks[chunk, None], grid, align_corners=False)[:, 0]  # [n, h, w]
        if len(chunk) == 1:  # no padding: a plain slice write
            top_k, left_k = int(top[chunk[0]]), int(left[chunk[0]])
            out[chunk[0], 0, top_k:top_k + h_max, left_k:left_k + w_max] = sampled[0]
            continue
        inside = ((cols - left[chunk, None] < widths[chunk, None])[:, None, :]
                  & (rows - top[chunk, None] < heights[chunk, None])[:, :, None])  # [n, h, w]: within its extent
        # Padding cells add an exact 0 to some pixel of their own box's plane (clamped into the image), so one
        # index_add writes every box's extent with no boolean compaction; each pixel of an extent gets its value once.
        pixel = (chunk[:, None, None] * (height * width) + rows.clamp(max=height - 1)[:, :, None] * width
                 + cols.clamp(max=width - 1)[:, None, :])
        flat_out.index_add_(0, pixel.flatten(), torch.where(inside, sampled, 0).flatten())
    return out


# Extents larger than this many pixels are pasted one per chunk: batching saves per-box overhead on small boxes, while
# on large ones the padding to the chunk's largest height and width would cost more than it saves.
OWN_CHUNK_AREA = 64 * 64


def _chunks_of_similar_extent(widths: list[int], heights: list[int], max_samples: int) -> list[list[int]]:
    """Indices of the non-empty extents, by area, cut into chunks whose padded grid (count x max h x max w) stays
    within ``max_samples``; an extent larger than that or than ``OWN_CHUNK_AREA`` is a chunk of its own."""
    order = sorted((k for k in range(len(widths)) if widths[k] > 0 and heights[k] > 0),
                   key=lambda k: widths[k] * heights[k])  # ascending: after the first large extent all are large
    chunks: list[list[int]] = []
    h_max = w_max = 0
    for k in order:
        grown_h, grown_w = max(h_max, heights[k]), max(w_max, widths[k])
        padded = (len(chunks[-1]) + 1) * grown_h * grown_w if chunks else 0
        if chunks and padded <= max_samples and widths[k] * heights[k] <= OWN_CHUNK_AREA:
            chunks[-1].append(k)
            h_max, w_max = grown_h, grown_w
        else:
            chunks.append([k])
            h_max, w_max = heights[k], widths[k]
    return chunks
