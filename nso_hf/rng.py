"""Replay of the global random generators, so every pass of a micro-batch sees the same random draws.

Dropout masks, LayerDrop's layer choices, SpecAugment's masks and any other draw a forward makes from
a global generator must be identical at W + U and W - U, or the two-point difference would carry that
randomness as well as the weight noise (and its first-order term would no longer cancel). The global
generators are torch's (CPU, and every CUDA device once CUDA is initialised), numpy's legacy global
`RandomState` (`np.random.rand` and friends: transformers' wav2vec2 family draws its SpecAugment masks
there) and Python's `random`. Generators a model owns (a `torch.Generator`, `np.random.default_rng()`)
are not global and are not replayed.

Cost per capture: torch's CPU state (5 KiB), each CUDA device's (16 bytes of seed and offset, read
from the device), numpy's (2.5 KiB) and Python's (2.5 KiB); no device work besides the CUDA read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class GlobalRNGState:
    """The state of every global generator a forward may draw from: torch CPU and CUDA, numpy, Python."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    numpy: tuple[Any, ...]
    python: tuple[Any, ...]

    @classmethod
    def capture(cls) -> GlobalRNGState:
        # Only initialised CUDA is read: querying it would otherwise start a CUDA context.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda, numpy=np.random.get_state(), python=random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)

    def equals(self, other: GlobalRNGState) -> bool:
        """Whether every generator is in the same state in `self` and `other` (tests, assertions)."""
        same_cuda = (self.cuda is None) == (other.cuda is None) and (
            self.cuda is None or all(torch.equal(a, b) for a, b in zip(self.cuda, other.cuda, strict=True))
        )
        np_a, np_b = self.numpy, other.numpy
        same_numpy = np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and tuple(np_a[2:]) == tuple(np_b[2:])
        return torch.equal(self.cpu, other.cpu) and same_cuda and same_numpy and self.python == other.python
