"""Wall time of each optimizer step, measured by a callback (from `on_step_begin` to `on_step_end`).

The span covers the forward/backward passes of every micro-batch of the step, the optimizer step
and the other callbacks. It excludes loading and collating the batch (Trainer fetches a step's
micro-batches before `on_step_begin`) and the logging, evaluation and saving done after the step.
On CUDA both ends synchronise the device, so the span holds the kernels, not just their launch.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Records seconds per optimizer step in `self.seconds`."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds.append(self._now() - self._start)
            self._start = None
        return control

    def median_seconds(self, skip_first: int = 1) -> float:
        """Median step time, skipping warm-up steps (first-call allocations) when more steps exist.

        Args:
            skip_first: steps left out at the start (kept if they are all there is).

        Returns:
            Seconds; NaN when no step was timed.
        """
        times = self.seconds[skip_first:] if len(self.seconds) > skip_first else self.seconds
        return statistics.median(times) if times else float("nan")
