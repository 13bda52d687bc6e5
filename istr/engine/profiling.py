"""Per-iteration time breakdown of training (``python -m istr.train ... --profile N``).

Sections: data, backbone, pooling, head, matcher+losses, backward, optimizer (+ the rest of the
forward). The model parts are timed with forward hooks on ``model.backbone``, ``model.pooler``,
``model.head`` and ``model.criterion`` (names from docs/design.md); a part called inside another
(the pooler inside the head) is subtracted from its caller, so the rows add up to the iteration.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

MODULE_SECTIONS = {"backbone": "backbone", "pooler": "pooling", "head": "head", "criterion": "matcher+losses"}
ORDER = ("data", "backbone", "pooling", "head", "matcher+losses", "forward (rest)", "backward", "optimizer")


class StepProfiler:
    def __init__(self, model: nn.Module, device: torch.device):
        self.sync = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.iterations = 0
        self._stack: list[list] = []  # [section, start, time spent in nested timed modules]
        self._handles = []
        for attr, section in MODULE_SECTIONS.items():
            module = getattr(model, attr, None)
            if isinstance(module, nn.Module):
                self._handles.append(module.register_forward_pre_hook(self._enter(section)))
                self._handles.append(module.register_forward_hook(self._exit(section)))

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, section: str):
        def hook(module, args):
            self._stack.append([section, self._now(), 0.0])
        return hook

    def _exit(self, section: str):
        def hook(module, args, output):
            name, start, nested = self._stack.pop()
            elapsed = self._now() - start
            self.totals[name] += elapsed - nested
            if self._stack:
                self._stack[-1][2] += elapsed
        return hook

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time a block of the training step; module hooks inside it are taken out of ``name``."""
        hooked_before = sum(self.totals.get(s, 0.0) for s in MODULE_SECTIONS.values())
        start = self._now()
        yield
        elapsed = self._now() - start
        hooked = sum(self.totals.get(s, 0.0) for s in MODULE_SECTIONS.values()) - hooked_before
        self.totals["forward (rest)" if name == "forward" else name] += elapsed - hooked

    def step(self) -> None:
        self.iterations += 1

    def reset(self) -> None:
        """Forget what was measured so far (e.g. a warm-up iteration)."""
        self.totals.clear()
        self.iterations = 0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def table(self) -> str:
        """Mean milliseconds per iteration and share of the total, one row per section."""
        n = max(self.iterations, 1)
        total = sum(self.totals.values())
        lines = [f"{'section':<16}{'ms/iter':>10}{'share':>8}", "-" * 34]
        for name in ORDER:
            if name in self.totals:
                ms = 1000 * self.totals[name] / n
                lines.append(f"{name:<16}{ms:>10.1f}{100 * self.totals[name] / max(total, 1e-12):>7.1f}%")
        lines += ["-" * 34, f"{'total':<16}{1000 * total / n:>10.1f}{100.0:>7.1f}%  over {self.iterations} iterations"]
        return "\n".join(lines)
