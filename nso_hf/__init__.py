"""nso-hf: Noise Stability Optimization for the Hugging Face Trainer."""

from nso_hf.config import NSOConfig
from nso_hf.trainer import NSOMixin, NSOTrainer

__all__ = ["NSOConfig", "NSOMixin", "NSOTrainer"]
__version__ = "0.2.0"
