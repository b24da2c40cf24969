"""Moved to `nso_hf.flatness.mode`; this module keeps the 0.1 import path."""

from nso_hf.flatness.mode import DOUBLE_BACKWARD_ATTENTION, eager_attention, measurement_mode, measurement_state

__all__ = ["DOUBLE_BACKWARD_ATTENTION", "eager_attention", "measurement_mode", "measurement_state"]
