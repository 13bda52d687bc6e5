"""bf16 autocast on a CPU without native bf16: its matrix products and convolutions computed in fp32.

Under ``torch.autocast("cpu", torch.bfloat16)`` convolutions and matrix products get bf16 inputs. A CPU with
AVX512-BF16 or AMX multiplies them natively: fp32 accumulation, the result rounded to bf16. Without those
instructions torch falls back to slow kernels: on an AVX2-only AMD EPYC (Zen 1) one smoke training step took
25.9-31.6 s in bf16 against 2.2-2.6 s in fp32. ``Bf16ProductsInFp32`` gives those ops the native kernels' numerics
at fp32 speed: the bf16 inputs widened to fp32 (exact), the op run in fp32, its result rounded to bf16. Every
other op, and every dtype the rest of the model sees, stays as autocast makes it, so a run is the same bf16 job
(same config, same hash); tests/test_cpu_bf16.py holds each op to the exact product within bf16 rounding.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten, tree_map

from istr.engine import hardware

_aten = torch.ops.aten
# What autocast's lower-precision list reaches as after decomposition (linear -> addmm / mm, matmul -> mm / bmm,
# conv2d -> convolution), forward and backward.
FP32_COMPUTED_OPS = frozenset({
    _aten.convolution.default, _aten.convolution_backward.default, _aten.mm.default, _aten.addmm.default,
    _aten.bmm.default, _aten.baddbmm.default,
})


def _all_bf16(args: Any) -> bool:
    tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.dtype == torch.bfloat16 for t in tensors)


def _widen(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) else value


def _round_to_bf16(value: Any) -> Any:
    return value.to(torch.bfloat16) if isinstance(value, torch.Tensor) else value


class Bf16ProductsInFp32(TorchDispatchMode):
    """Runs the ops of ``FP32_COMPUTED_OPS`` whose tensors are all bf16 in fp32 and rounds their results to bf16.

    Ops with other dtypes (mixed ones included, which keep their own error) pass through unchanged. Active for
    the autograd backward too, which runs on the thread that calls ``backward()`` on CPU.
    """

    @staticmethod
    def computes_in_fp32(func, args, kwargs) -> bool:
        return func in FP32_COMPUTED_OPS and _all_bf16((args, kwargs))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.computes_in_fp32(func, args, kwargs):
            return tree_map(_round_to_bf16, func(*tree_map(_widen, args), **tree_map(_widen, kwargs)))
        return func(*args, **kwargs)


def needs_fp32_products(amp: str, device_type: str, cpuinfo: Optional[str] = None) -> bool:
    """True for bf16 autocast on a CPU whose /proc/cpuinfo flags show no native bf16."""
    return amp == "bf16" and device_type == "cpu" and hardware.native_bf16(cpuinfo) is False


def bf16_products_in_fp32(amp: str, device: torch.device | str) -> ContextManager:
    """``Bf16ProductsInFp32`` where ``needs_fp32_products``, a no-op context otherwise (or when already active)."""
    active = any(isinstance(mode, Bf16ProductsInFp32) for mode in _get_current_dispatch_mode_stack())
    if active or not needs_fp32_products(amp, torch.device(device).type):
        return contextlib.nullcontext()
    return Bf16ProductsInFp32()


def fp32_products_note(amp: str, device_type: str) -> Optional[str]:
    """One line for the job log where ``needs_fp32_products`` (None otherwise)."""
    if not needs_fp32_products(amp, device_type):
        return None
    return ("solver.amp=bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): convolutions and "
            "matrix products are computed in fp32 and rounded to bf16, the numerics of native bf16 kernels at fp32 speed "
            "(istr/engine/cpu_bf16.py)")
