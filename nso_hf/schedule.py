"""Which optimizer steps run the method's passes: a late phase (`perturb_start`) and every n-th step (`perturb_every`).

A step outside the schedule is Trainer's own step (one forward+backward per micro-batch, no weight
copy, no noise, no extra collective). The decision is a pure function of the global step and the
run's `max_steps`, so it is the same for every micro-batch of an accumulation window and on every
rank, and a resumed run (which restores both) takes exactly the decisions of the uninterrupted one.

    first = floor(perturb_start * max_steps)                 the first perturbed step (0-based)
    step t is perturbed  <=>  t >= first and (t - first) % perturb_every == 0

The fraction is read as the decimal the user wrote (0.29 * 100 is 29, not 28.999...), so the plain
phase has exactly the length the number says.
"""

from __future__ import annotations

import math
from fractions import Fraction

from nso_hf.ramp import noise_ramp_factor


def first_perturbed_step(max_steps: int, perturb_start: float) -> int:
    """The 0-based optimizer step at which the perturbed phase begins.

    Args:
        max_steps: the run's optimizer steps (`TrainerState.max_steps`); <= 0 (unknown, e.g. a step
            called outside `train`) perturbs from step 0.
        perturb_start: the fraction of `max_steps` trained plainly first, in [0, 1).

    Returns:
        floor(perturb_start * max_steps), computed exactly from the decimal value of `perturb_start`.
    """
    if max_steps <= 0 or perturb_start <= 0:
        return 0
    return math.floor(Fraction(repr(float(perturb_start))) * max_steps)


def is_perturbed_step(step: int, max_steps: int, perturb_start: float, perturb_every: int) -> bool:
    """Whether optimizer step `step` (0-based, `TrainerState.global_step` before the update) runs the method's passes.

    Args:
        step: optimizer steps taken so far.
        max_steps: the run's optimizer steps.
        perturb_start: fraction of `max_steps` trained plainly first.
        perturb_every: inside the perturbed phase, only every n-th step is perturbed, counted from its first step.

    Returns:
        True for a perturbed step, False for a plain one.
    """
    first = first_perturbed_step(max_steps, perturb_start)
    return step >= first and (step - first) % perturb_every == 0


def perturbed_step_count(max_steps: int, perturb_start: float, perturb_every: int) -> int:
    """How many of the run's `max_steps` optimizer steps are perturbed.

    Args:
        max_steps: the run's optimizer steps (> 0).
        perturb_start: fraction trained plainly first.
        perturb_every: the period inside the perturbed phase.

    Returns:
        ceil((max_steps - first) / perturb_every): the steps first, first + n, ... below max_steps.
    """
    first = first_perturbed_step(max_steps, perturb_start)
    return max(0, -(-(max_steps - first) // perturb_every))


def scheduled_passes(max_steps: int, perturb_start: float, perturb_every: int, passes_per_step: int) -> int:
    """Forward+backward passes per micro-batch slot over a whole run: a plain step makes 1, a perturbed one `passes_per_step`.

    Multiply by the micro-batches per optimizer step (gradient accumulation) for the run's total.

    Args:
        max_steps: the run's optimizer steps.
        perturb_start: fraction trained plainly first.
        perturb_every: the period inside the perturbed phase.
        passes_per_step: the method's passes per micro-batch on a perturbed step (`NSOConfig.passes_per_micro_batch`).

    Returns:
        max_steps + (passes_per_step - 1) * perturbed_step_count(...).
    """
    return max_steps + (passes_per_step - 1) * perturbed_step_count(max_steps, perturb_start, perturb_every)


def ramp_factor(step: int, max_steps: int, perturb_start: float, ramp: str) -> float:
    """The noise ramp's multiplier of sigma at `step`, with the ramp spanning the perturbed phase only.

    Args:
        step: optimizer steps taken so far.
        max_steps: the run's optimizer steps.
        perturb_start: fraction trained plainly first (the ramp starts at the first perturbed step).
        ramp: "none" or "cosine" (`nso_hf.ramp.noise_ramp_factor`).

    Returns:
        A float in [0, 1]; with `perturb_start` 0, exactly `noise_ramp_factor(step, max_steps, ramp)`.
    """
    first = first_perturbed_step(max_steps, perturb_start)
    return noise_ramp_factor(step - first, max_steps - first, ramp)


def schedule_name(perturb_start: float, perturb_every: int) -> str:
    """How reports name a schedule: "late 0.75", "every 2", "late 0.5 every 2", or "" for every step."""
    parts = ([f"late {perturb_start:g}"] if perturb_start > 0 else []) + ([f"every {perturb_every}"] if perturb_every > 1 else [])
    return " ".join(parts)
