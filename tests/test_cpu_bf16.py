"""bf16 products computed in fp32 (istr/engine/cpu_bf16.py): each op equals a native bf16 kernel's numerics (the exact
product of the bf16 inputs, fp32 accumulation, rounded once to bf16), it is chosen only where the CPU lacks native
bf16, and a bf16 training job runs its forward and backward through it there."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from istr.config import build_config
from istr.engine import cpu_bf16, hardware
from istr.engine.cpu_bf16 import Bf16ProductsInFp32, bf16_products_in_fp32, needs_fp32_products
from istr.engine.job import train_and_evaluate
from tests.test_hardware import SAPPHIRE_RAPIDS, ZEN1

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits
FP32_EPS = 2.0**-23


class RecordingMode(Bf16ProductsInFp32):
    """Bf16ProductsInFp32 that records the ops it computes in fp32."""

    def __init__(self):
        super().__init__()
        self.computed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.computes_in_fp32(func, args, kwargs or {}):
            self.computed.append(func.overloadpacket.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _bf16(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(torch.bfloat16)


def _assert_rounded_exact(result, exact, magnitude, depth):
    """``result`` is ``exact`` rounded to bf16, up to fp32 accumulation over ``depth`` terms of ``magnitude``
    (the same op on the absolute values)."""
    assert result.dtype == torch.bfloat16
    error = (result.double() - exact).abs()
    bound = BF16_UNIT_ROUNDOFF * exact.abs() + depth * FP32_EPS * magnitude
    assert bool((error <= bound).all()), f"worst excess {(error - bound).max().item():.3g}"
    assert error.max().item() > 0  # the result really is rounded to bf16, not returned in fp32


@pytest.mark.parametrize("op", ["mm", "addmm", "bmm", "baddbmm"])
def test_matrix_products_are_the_rounded_exact_product(op):
    torch.manual_seed(0)
    k = 300
    a, b = (_bf16(40, k), _bf16(k, 24)) if op in ("mm", "addmm") else (_bf16(5, 40, k), _bf16(5, k, 24))
    c = _bf16(24) if op == "addmm" else _bf16(5, 40, 24) if op == "baddbmm" else None
    fn = {"mm": torch.mm, "bmm": torch.bmm, "addmm": torch.addmm, "baddbmm": torch.baddbmm}[op]
    args = (a, b) if c is None else (c, a, b)
    mode = RecordingMode()
    with mode:
        result = fn(*args)
    assert mode.computed == [op]
    exact = fn(*[t.double() for t in args])
    magnitude = fn(*[t.double().abs() for t in args])
    _assert_rounded_exact(result, exact, magnitude, k + 1)


def test_convolution_and_its_gradients_are_the_rounded_exact_ones():
    torch.manual_seed(0)
    x, w, bias, grad_out = _bf16(2, 16, 12, 10), _bf16(8, 16, 3, 3, scale=0.1), _bf16(8), _bf16(2, 8, 12, 10)
    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    mode = RecordingMode()
    with mode:
        out = F.conv2d(*leaves, padding=1)
        out.backward(grad_out)
    assert mode.computed == ["convolution", "convolution_backward"]

    exact_leaves = [t.double().requires_grad_() for t in (x, w, bias)]
    exact = F.conv2d(*exact_leaves, padding=1)
    exact.backward(grad_out.double())
    abs_leaves = [t.double().abs().requires_grad_() for t in (x, w, bias)]
    magnitude = F.conv2d(*abs_leaves, padding=1)
    magnitude.backward(grad_out.double().abs())
    _assert_rounded_exact(out.detach(), exact.detach(), magnitude.detach(), 16 * 9 + 1)
    for leaf, exact_leaf, abs_leaf, terms in zip(leaves, exact_leaves, abs_leaves, (8 * 9, 2 * 12 * 10, 2 * 12 * 10)):
        _assert_rounded_exact(leaf.grad, exact_leaf.grad, abs_leaf.grad, terms)


def test_other_dtypes_pass_through_unchanged():
    torch.manual_seed(0)
    a, b = torch.randn(30, 20), torch.randn(20, 10)
    mode = RecordingMode()
    with mode:
        same = torch.mm(a, b)
        with pytest.raises(RuntimeError):  # mixed dtypes keep their own error, as without the mode
            torch.mm(a.to(torch.bfloat16), b)
    assert mode.computed == []
    assert torch.equal(same, torch.mm(a, b))


def test_chosen_only_for_bf16_on_a_cpu_without_native_bf16(monkeypatch):
    assert needs_fp32_products("bf16", "cpu", ZEN1)
    assert not needs_fp32_products("bf16", "cpu", SAPPHIRE_RAPIDS)
    assert not needs_fp32_products("none", "cpu", ZEN1)
    assert not needs_fp32_products("bf16", "cuda", ZEN1)
    assert not needs_fp32_products("bf16", "cpu", "processor\t: 0\n")  # flags unknown: torch's own kernels
    monkeypatch.setattr(hardware, "native_bf16", lambda cpuinfo=None: False)
    outer = bf16_products_in_fp32("bf16", "cpu")
    assert isinstance(outer, Bf16ProductsInFp32)
    with outer:
        assert isinstance(bf16_products_in_fp32("bf16", torch.device("cpu")), contextlib.nullcontext)  # not twice
    assert isinstance(bf16_products_in_fp32("none", "cpu"), contextlib.nullcontext)
    monkeypatch.setattr(hardware, "native_bf16", lambda cpuinfo=None: True)
    assert isinstance(bf16_products_in_fp32("bf16", "cpu"), contextlib.nullcontext)


def test_a_bf16_job_trains_and_evaluates_through_it(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "native_bf16", lambda cpuinfo=None: False)
    modes: list[RecordingMode] = []

    class Recorded(RecordingMode):
        def __init__(self):
            super().__init__()
            modes.append(self)

    monkeypatch.setattr(cpu_bf16, "Bf16ProductsInFp32", Recorded)
    cfg = build_config("tiny", {"solver.amp": "bf16", "data.cache_dir": str(tmp_path / "cache")})
    metrics = train_and_evaluate(cfg, tmp_path / "run")
    computed = {op for mode in modes for op in mode.computed}
    assert {"convolution", "convolution_backward", "mm", "bmm"} <= computed, computed
    assert metrics["iterations"] == cfg.solver.max_iter and "mask_AP" in metrics["final"]
