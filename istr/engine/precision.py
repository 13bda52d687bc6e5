"""The mixed precision that ``solver.amp`` names ("none", "bf16", "fp16"): one autocast context for every loop.

Training, evaluation, the trunk pretraining and the latency timing all enter this context, so a value the
device cannot run (fp16 on CPU) is refused in one place. On a CPU without native bf16 the loops also enter
``istr.engine.cpu_bf16.bf16_products_in_fp32`` (same numerics, fp32 speed).
"""
from __future__ import annotations

import torch

from istr.config import ConfigError


def autocast(device: torch.device | str, amp: str) -> torch.autocast:
    """The autocast context of ``solver.amp``: bf16 on CPU or CUDA, fp16 on CUDA only, disabled for "none"."""
    device_type = torch.device(device).type
    if amp == "fp16" and device_type != "cuda":
        raise ConfigError("solver.amp=fp16 needs a CUDA device; use solver.amp=bf16 on CPU")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type, dtype=dtype, enabled=amp != "none")
