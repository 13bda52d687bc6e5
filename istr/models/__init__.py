"""The ISTR model library: ``build_model(cfg.model, mask_codec)`` returns an ``ISTR`` (see docs/design.md)."""
from __future__ import annotations

from typing import Optional

from istr.config import ModelConfig
from istr.models.istr import ISTR
from istr.models.mask_coding import MaskCodec, fit_pca, soften

__all__ = ["ISTR", "MaskCodec", "build_model", "build_mask_codec", "fit_pca", "soften"]


def build_mask_codec(cfg: ModelConfig) -> MaskCodec:
    """The codec a config asks for when none is fitted yet: identity for "raw", an unfitted placeholder for "pca"."""
    if cfg.mask.representation == "raw":
        return MaskCodec.identity(cfg.mask.resolution)
    return MaskCodec.placeholder(cfg.mask.components, cfg.mask.resolution)


def build_model(cfg: ModelConfig, mask_codec: Optional[MaskCodec] = None) -> ISTR:
    """ISTR for ``cfg`` (a ``ModelConfig``). ``mask_codec``: a fitted codec; None gives ``build_mask_codec(cfg)``."""
    if mask_codec is None:
        mask_codec = build_mask_codec(cfg)
    expected = cfg.mask.resolution**2 if cfg.mask.representation == "raw" else cfg.mask.components
    if mask_codec.dim != expected or mask_codec.resolution != cfg.mask.resolution:
        raise ValueError(f"build_model: mask codec has {mask_codec.dim} components at {mask_codec.resolution}x"
                         f"{mask_codec.resolution}, but model.mask asks for {expected} at {cfg.mask.resolution}x"
                         f"{cfg.mask.resolution} ({cfg.mask.representation})")
    return ISTR(cfg, mask_codec)
