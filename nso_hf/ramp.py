"""The strength of the training noise over time: constant, or Flat-LoRA's cosine ramp."""

from __future__ import annotations

import math


def noise_ramp_factor(step: int, total_steps: int, ramp: str) -> float:
    """The multiplier of sigma at optimizer step `step` of `total_steps`.

    Args:
        step: optimizer steps taken so far (`TrainerState.global_step`).
        total_steps: the run's optimizer steps (`TrainerState.max_steps`); <= 0 counts as 1.
        ramp: "none" (always 1) or "cosine": (1 - cos(pi t / T)) / 2, rising from 0 at the first step
            to 1 at the last (Flat-LoRA's schedule), held at 1 past T.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: an unknown ramp.
    """
    if ramp == "none":
        return 1.0
    if ramp == "cosine":
        t = min(max(step, 0) / max(total_steps, 1), 1.0)
        return 0.5 * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"NSOConfig.noise_ramp must be 'none' or 'cosine', got {ramp!r}.")
