"""Moved to `nso_hf.flatness.callback`; this module keeps the 0.1 import path."""

from nso_hf.flatness.callback import FlatnessCallback

__all__ = ["FlatnessCallback"]
