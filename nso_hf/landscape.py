"""Moved to `nso_hf.flatness.landscape`; this module keeps the 0.1 import path."""

from nso_hf.flatness.landscape import (
    LossCurve,
    LossSurface,
    filter_normalized_direction,
    loss_at_offsets,
    loss_curve,
    loss_surface,
)

__all__ = ["LossCurve", "LossSurface", "filter_normalized_direction", "loss_at_offsets", "loss_curve", "loss_surface"]
