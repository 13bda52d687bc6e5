"""Inference fast path: the same function as the trained model, computed with fewer memory passes.

``optimize_for_inference(model)`` returns an eval-mode copy in which
- every frozen (or eval-mode) batch norm that directly follows a convolution is folded into that
  convolution's weight and bias (one pass over each feature map instead of two);
- 4-D weights are stored channels_last, which oneDNN (CPU) and cuDNN (GPU) convolutions run faster;
  the backbone's output maps are made contiguous (NCHW) once, because RoIAlign would otherwise copy a
  whole pyramid level to NCHW at every call (6 stages x 4 levels).
Numerics change only by float rounding: outputs agree with the original model to about 1e-4 relative
(tests/test_fast_path.py states the tolerance it checks). Run the copy under ``torch.inference_mode``.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

_BATCH_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


def fold_batch_norm(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A convolution computing ``bn(conv(x))``; ``bn`` is FrozenBatchNorm2d or an eval-mode BatchNorm2d."""
    eps = bn.eps
    scale = bn.weight * torch.rsqrt(bn.running_var + eps)  # [C_out]
    shift = bn.bias - bn.running_mean * scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        fused.bias.copy_(conv_bias * scale + shift)
    return fused.to(conv.weight.device)


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) children of ``parent`` where the BN is applied to the conv's output.

    Two layouts guarantee that data flow: an ``nn.Sequential`` with the BN right after the conv
    (torchvision's ``downsample``), and torchvision ResNet's sibling pairs ``convK`` / ``bnK``.
    """
    children = dict(parent.named_children())
    pairs = []
    if isinstance(parent, nn.Sequential):
        names = list(children)
        pairs += [(a, b) for a, b in zip(names, names[1:])
                  if isinstance(children[a], nn.Conv2d) and isinstance(children[b], _BATCH_NORMS)]
    for name, child in children.items():
        match = re.fullmatch(r"conv(\d+)", name)
        bn = children.get(f"bn{match.group(1)}") if match else None
        if isinstance(child, nn.Conv2d) and isinstance(bn, _BATCH_NORMS):
            pairs.append((name, f"bn{match.group(1)}"))
    return pairs


def fold_all_batch_norms(model: nn.Module) -> int:
    """Fold every conv -> BN pair of ``model`` in place (BN becomes Identity); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            bn = getattr(parent, bn_name)
            if isinstance(bn, nn.BatchNorm2d) and bn.training:
                raise ValueError(f"cannot fold {type(parent).__name__}.{bn_name}: BatchNorm2d in training mode")
            setattr(parent, conv_name, fold_batch_norm(getattr(parent, conv_name), bn))
            setattr(parent, bn_name, nn.Identity())
            count += 1
    return count


def _contiguous_outputs(module: nn.Module, args, output):
    """Forward hook: the module's dict/list/tensor outputs in the default (NCHW) memory layout."""
    if isinstance(output, dict):
        return type(output)((k, v.contiguous()) for k, v in output.items())
    if isinstance(output, (list, tuple)):
        return type(output)(v.contiguous() for v in output)
    return output.contiguous()


def to_channels_last(model: nn.Module, nchw_outputs: str | None = "backbone") -> nn.Module:
    """``model`` in place with channels_last 4-D weights, the outputs of sub-module ``nchw_outputs`` back in NCHW.

    Convolutions given a channels_last weight compute (and return) channels_last maps; used for inference
    and, with ``solver.channels_last``, for training (parameters keep their layout through optimizer steps
    and ``load_state_dict``).
    """
    model.to(memory_format=torch.channels_last)
    if nchw_outputs:
        model.get_submodule(nchw_outputs).register_forward_hook(_contiguous_outputs)
    return model


def optimize_for_inference(model: nn.Module, channels_last: bool = True, nchw_outputs: str | None = "backbone") -> nn.Module:
    """An eval-mode copy of ``model`` with batch norms folded and (optionally) channels_last weights.

    ``nchw_outputs``: the sub-module whose outputs go back to NCHW when ``channels_last`` (None: none).
    """
    fast = copy.deepcopy(model).eval()
    fold_all_batch_norms(fast)
    return to_channels_last(fast, nchw_outputs) if channels_last else fast
