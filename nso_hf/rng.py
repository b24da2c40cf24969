"""Replay of the global random state, so every pass of a micro-batch sees the same random draws.

Dropout masks (and any other draw the model makes from the global RNG) must be identical at
W + U and W - U, or the two-point difference would carry dropout noise as well as weight noise.
Each pass starts from the state captured before the first one; after the last pass the state is
where a single Trainer pass would have left it, so data order and later dropout match plain Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalRNGState:
    """The CPU generator's state and, when CUDA is initialised, every CUDA device's."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> GlobalRNGState:
        # Only initialised CUDA is read: querying it would otherwise start a CUDA context.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
