"""solver.amp -> autocast: one context for training, evaluation, pretraining and latency timing."""
import pytest
import torch

from istr.config import ConfigError
from istr.engine.precision import autocast


def test_bf16_autocast_on_cpu_gives_bf16_products_and_none_keeps_fp32():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "none"):
        assert (a @ b).dtype == torch.float32


def test_fp16_on_cpu_is_refused_with_the_alternative():
    with pytest.raises(ConfigError, match="solver.amp=fp16 needs a CUDA device; use solver.amp=bf16 on CPU"):
        autocast("cpu", "fp16")


def test_evaluation_refuses_fp16_on_cpu_like_training():
    """predict() used to build its own autocast and ran fp16 on a CPU; it now goes through the same check."""
    from istr.engine.evaluate import predict

    dataset = [(torch.zeros(3, 8, 8), {"orig_size": torch.tensor([8, 8]), "image_id": 1})]
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        predict(torch.nn.Identity(), dataset, [1], torch.device("cpu"), amp="fp16")
