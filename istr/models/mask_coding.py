"""Mask embeddings: soft labels, a streaming float64 whitened PCA, and the fixed encoder/decoder.

A mask is a ``R x R`` (R = 28) crop of an instance inside its box. Following the official code, the binary
crop is softened (``soften``), mapped to logit space and projected on the leading principal components:

    encode(soft)  = (logit(soft) - mean) @ components.T / sqrt(explained_variance)        [N, l]
    decode(emb)   = sigmoid(emb * sqrt(explained_variance) @ components + mean)           [N, R, R]

``MaskCodec.identity`` is Table 1a's raw-mask row ("mask"): components = identity, variance 1, mean 0, so
encode = logit(soft) and decode = sigmoid(logits) over all R*R pixels, without whitening.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

_LOGIT_EPS = 1e-6  # keeps logit finite if a caller passes hard 0/1 masks


def soften(binary: Tensor, r_min: float, r_max: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Soft labels: 1 - r inside the mask, r outside, r = max(r_max * U(0, 1), r_min) per pixel.

    binary: [N, R, R] bool/uint8/float in {0, 1} -> [N, R, R] float32.
    """
    u = torch.rand(binary.shape, generator=generator, dtype=torch.float32, device=binary.device)
    r = (r_max * u).clamp_min(r_min)
    return torch.where(binary.bool(), 1.0 - r, r)


class MaskCodec(nn.Module):
    """Fixed linear mask encoder/decoder (buffers, never trained). Metadata travels in the state dict."""

    def __init__(self, components: Tensor, explained_variance: Tensor, mean: Tensor, total_variance: float,
                 metadata: Optional[dict[str, Any]] = None):
        """components [l, R*R] orthonormal rows; explained_variance [l]; mean [R*R]; total_variance: trace of the
        covariance (for explained-variance ratios)."""
        super().__init__()
        dim = mean.numel()
        if components.shape[1] != dim or explained_variance.shape != components.shape[:1]:
            raise ValueError(f"MaskCodec: inconsistent shapes components {tuple(components.shape)}, "
                             f"variance {tuple(explained_variance.shape)}, mean {tuple(mean.shape)}")
        self.resolution = math.isqrt(dim)
        self.register_buffer("components", components.float().contiguous())
        self.register_buffer("explained_variance", explained_variance.float().contiguous())
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("total_variance", torch.tensor(float(total_variance)))
        self.metadata: dict[str, Any] = dict(metadata or {})

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def identity(cls, resolution: int = 28) -> "MaskCodec":
        """Raw-mask representation: embedding = per-pixel logits (l = R*R), no whitening."""
        dim = resolution * resolution
        return cls(torch.eye(dim), torch.ones(dim), torch.zeros(dim), float(dim),
                   {"representation": "raw", "fitted": True})

    @classmethod
    def placeholder(cls, components: int, resolution: int = 28) -> "MaskCodec":
        """Unfitted codec of the right shape (tests, or before loading a checkpoint's buffers)."""
        dim = resolution * resolution
        return cls(torch.eye(dim)[:components], torch.ones(components), torch.zeros(dim), float(dim),
                   {"representation": "pca", "fitted": False})

    # -- the codec ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def encode(self, soft: Tensor) -> Tensor:
        """soft [N, R, R] probabilities in (0, 1) -> embeddings [N, l]."""
        x = soft.float().flatten(1).clamp(_LOGIT_EPS, 1 - _LOGIT_EPS)
        x = torch.logit(x) - self.mean
        return (x @ self.components.T) / self.explained_variance.sqrt()

    def decode_logits(self, emb: Tensor) -> Tensor:
        """emb [N, l] -> mask logits [N, R*R] (differentiable: the dice loss flows through it)."""
        return (emb.float() * self.explained_variance.sqrt()) @ self.components + self.mean

    def decode(self, emb: Tensor) -> Tensor:
        """emb [N, l] -> mask probabilities [N, R, R]."""
        return self.decode_logits(emb).sigmoid().view(-1, self.resolution, self.resolution)

    @property
    def explained_variance_ratio(self) -> Tensor:
        """[l] fraction of the total variance carried by each kept component."""
        return self.explained_variance / self.total_variance

    def cumulative_explained_variance(self) -> Tensor:
        """[l] cumulative explained-variance ratio (Figure 1)."""
        return self.explained_variance_ratio.cumsum(0)

    # -- persistence -------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return self.metadata

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.metadata = dict(state)

    def save(self, path: str | Path) -> None:
        """Atomic write of buffers + metadata (torch.save)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {k: v.cpu() for k, v in self.state_dict().items() if isinstance(v, Tensor)}
        payload["metadata"] = self.metadata
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "MaskCodec":
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise ValueError(f"{path}: cannot read mask codec ({err.__class__.__name__}: {err})") from err
        needed = ("components", "explained_variance", "mean", "total_variance", "metadata")
        missing = [k for k in needed if k not in payload]
        if missing:
            raise ValueError(f"{path}: not a mask codec file, missing {', '.join(missing)}")
        return cls(payload["components"], payload["explained_variance"], payload["mean"],
                   float(payload["total_variance"]), payload["metadata"])


class _StreamingMoments:
    """Mean and scatter matrix of a stream of vectors, merged batch by batch in float64 (Chan et al.)."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """x [n, dim]."""
        x = x.to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        centred = x - batch_mean
        delta = batch_mean - self.mean
        total = self.count + n
        self.scatter += centred.T @ centred + torch.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def covariance(self) -> Tensor:
        return self.scatter / (self.count - 1)  # ddof = 1, as sklearn's (Incremental)PCA


def fit_pca(mask_batches: Iterable[Tensor], components: int, r_min: float = 0.01, r_max: float = 0.05,
            seed: int = 0, source: str = "", resolution: int = 28) -> MaskCodec:
    """Whitened PCA of softened masks in logit space, in one pass over ``mask_batches``.

    mask_batches: iterable of binary crops [n, R, R]; only the float64 mean and covariance are kept in memory.
    The covariance is eigendecomposed exactly (torch.linalg.eigh); eigenvector signs are fixed so that each
    component's largest-magnitude entry is positive.
    """
    dim = resolution * resolution
    if not 1 <= components <= dim:
        raise ValueError(f"fit_pca: components must be in 1..{dim}, got {components}")
    generator = torch.Generator().manual_seed(seed)
    moments = _StreamingMoments(dim)
    for batch in mask_batches:
        if batch.ndim != 3 or batch.shape[1:] != (resolution, resolution):
            raise ValueError(f"fit_pca: expected mask batches [n, {resolution}, {resolution}], got {tuple(batch.shape)}")
        soft = soften(batch.cpu(), r_min, r_max, generator).to(torch.float64)
        moments.update(torch.logit(soft).flatten(1))
    if moments.count <= components:
        raise ValueError(f"fit_pca: {components} components need more than {components} masks, got {moments.count}")
    eigvals, eigvecs = torch.linalg.eigh(moments.covariance())
    order = eigvals.argsort(descending=True)
    eigvals = eigvals[order].clamp_min(0.0)
    eigvecs = eigvecs[:, order].T  # rows = components
    signs = torch.sign(eigvecs.gather(1, eigvecs.abs().argmax(1, keepdim=True)))
    eigvecs = eigvecs * signs
    total = float(eigvals.sum())
    # A zero-variance direction cannot be whitened; give it a tiny floor so encode/decode stay finite.
    kept_var = eigvals[:components].clamp_min(total * 1e-12 + 1e-30)
    metadata = {
        "representation": "pca",
        "fitted": True,
        "source": source,
        "count": moments.count,
        "r_min": r_min,
        "r_max": r_max,
        "seed": seed,
        "resolution": resolution,
        "explained_variance": kept_var.tolist(),
        "spectrum_ratio": (eigvals / total).tolist() if total > 0 else [0.0] * dim,  # all R*R, for Figure 1
    }
    return MaskCodec(eigvecs[:components], kept_var, moments.mean, total, metadata)
