"""RoIAlign as a sparse matrix product (same values as torchvision.ops.roi_align, faster CPU backward).

RoIAlign is linear in the feature map: every output cell is a fixed weighted sum of at most
4 * sampling_ratio^2 input pixels (bilinear corners of its samples, averaged). We build that sparse weight
matrix M [R*S*S, B*H*W] (as per-row column/weight lists) once per call and compute out = M @ features
(channels last, free when the maps already are) with embedding_bag; the backward M^T @ grad is a second
embedding_bag over the same entries sorted by column (``_SparseRowGather``), because embedding_bag's own
dense backward is several times slower on the CPU. torchvision's CPU backward is a single-threaded scatter
(cpu-training-facts.md). Measured on the 2-core machine: 400 RoIs on a [8, 128, 32, 44] map, forward + backward,
one thread: 151 ms -> 27 ms; a full smoke-scale training step (6 stages, batch 8, 128x176, fp32): 1.91 s -> 1.10 s
with 2 threads. tests/test_models.py pins the values (1e-5) and gradients (1e-4) to torchvision.ops.roi_align.

Sampling follows torchvision's CPU kernel exactly: with ``aligned`` the box is shifted by -0.5 pixel and not
forced to size >= 1; sample points outside [-1, size] contribute zero; coordinates are clamped to [0, size-1].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _axis_weights(start: Tensor, bin_size: Tensor, size: int, bins: int, samples: int) -> tuple[Tensor, Tensor]:
    """Bilinear weights along one axis.

    start, bin_size [R] -> (index [R, bins, samples, 2] int64, weight [R, bins, samples, 2]) for the low and
    high neighbour of every sample point of every bin.
    """
    steps = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None]
    offsets = (torch.arange(samples, dtype=start.dtype, device=start.device)[None, :] + 0.5) / samples
    coord = start[:, None, None] + (steps + offsets)[None] * bin_size[:, None, None]  # [R, bins, samples]
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.floor().clamp(max=size - 1)
    coord = torch.where(low >= size - 1, low, coord)
    frac = coord - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    index = torch.stack([low, high], -1)
    weight = torch.stack([1 - frac, frac], -1) * valid[..., None]
    return index, weight


def roi_align_matrix(rois: Tensor, feature_shape: tuple[int, int, int], output_size: int, spatial_scale: float,
                     sampling_ratio: int, aligned: bool) -> tuple[Tensor, Tensor]:
    """The RoIAlign weight matrix M [R*S*S, B*H*W] in row-list form (a fixed number of entries per row).

    Returns (column [R*S*S, K] int32 (int64 for huge maps), weight [R*S*S, K]), K = 4 * sampling_ratio^2: row (roi, y, x) of M has
    ``weight`` at columns ``column`` (image, y, x) and zeros elsewhere.
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_align_matmul: needs a fixed sampling_ratio > 0 (adaptive sampling is not supported)")
    batch, height, width = feature_shape
    s, sr = output_size, sampling_ratio
    rois = rois.float()
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w, roi_h = rois[:, 3] * spatial_scale - offset - x1, rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    y_index, y_weight = _axis_weights(y1, roi_h / s, height, s, sr)  # [R, S, sr, 2]
    x_index, x_weight = _axis_weights(x1, roi_w / s, width, s, sr)
    # dims: roi, out y, out x, sample y, sample x, corner y, corner x
    weight = (y_weight[:, :, None, :, None, :, None] * x_weight[:, None, :, None, :, None, :]) / (sr * sr)
    base = rois[:, 0].long() * (height * width)
    column = (base[:, None, None, None, None, None, None] + y_index[:, :, None, :, None, :, None] * width
              + x_index[:, None, :, None, :, None, :])
    num_rows = rois.shape[0] * s * s
    if batch * height * width < 2**31:
        column = column.int()  # embedding_bag's backward sorts the indices: int32 sorts faster
    return column.reshape(num_rows, -1), weight.reshape(num_rows, -1)


def roi_align_matmul(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                     sampling_ratio: int, aligned: bool) -> Tensor:
    """Drop-in for torchvision.ops.roi_align(features [B, C, H, W], rois [R, 5], ...) -> [R, C, S, S] (float32).

    out = M @ features (channels last), computed by embedding_bag as a weighted row gather; its autograd
    backward is the product with M^T (a multi-threaded accumulation).
    """
    b, c, h, w = features.shape
    column, weight = roi_align_matrix(rois, (b, h, w), output_size, spatial_scale, sampling_ratio, aligned)
    flat = features.float().permute(0, 2, 3, 1).reshape(b * h * w, c)  # channels last
    out = _SparseRowGather.apply(flat, column, weight)
    return out.view(-1, output_size, output_size, c).permute(0, 3, 1, 2)


class _SparseRowGather(torch.autograd.Function):
    """out = M @ flat for M given in row-list form (column, weight [rows, K]); flat [N, C] -> out [rows, C].

    Backward: grad_flat = M^T @ grad_out, the same gather over M^T, whose row-list form is M's entries sorted
    by column (bags of varying length, hence offsets).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, column: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(column, weight)
        ctx.num_columns = flat.shape[0]
        return nn.functional.embedding_bag(column, flat, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        column, weight = ctx.saved_tensors
        entries = column.flatten()
        order = entries.argsort()
        counts = torch.bincount(entries, minlength=ctx.num_columns)
        offsets = torch.zeros_like(counts)
        offsets[1:] = counts.cumsum(0)[:-1]
        rows = torch.div(order, column.shape[1], rounding_mode="floor")  # entry -> row of M, in column order
        grad_flat = nn.functional.embedding_bag(rows, grad_out.contiguous(), offsets,
                                                per_sample_weights=weight.flatten()[order], mode="sum")
        return grad_flat, None, None
