"""The compute a training run spent, counted in forward+backward passes: what a comparison at equal compute equalises.

Plain `Trainer` makes one pass per micro-batch. `NSOTrainer` makes the method's passes on a perturbed
step and one on a plain step of the schedule (`NSOConfig.perturb_start`, `perturb_every`), and counts
them itself (`NSOMixin.nso_passes`). Evaluation passes are not training compute and are not counted.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class MicroBatchCounter(TrainerCallback):
    """Counts the micro-batches this process trained: Trainer ends each with `on_substep_end` or, the last of an
    accumulation window, `on_step_end`."""

    def __init__(self) -> None:
        self.micro_batches = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.micro_batches += 1


def training_compute(trainer: Any, counter: MicroBatchCounter) -> dict[str, int]:
    """The passes this process ran in `trainer.train()`, for a results file.

    Args:
        trainer: a `Trainer` or an `NSOTrainer` (anything with `nso_passes`).
        counter: the `MicroBatchCounter` among the trainer's callbacks.

    Returns:
        {"micro_batches", "forward_backward_passes"}: this process's counts (per rank; since a resume,
        the steps run after it).
    """
    passes = getattr(trainer, "nso_passes", counter.micro_batches)
    return {"micro_batches": counter.micro_batches, "forward_backward_passes": passes}
