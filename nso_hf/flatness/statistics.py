"""Mean and standard error of Monte Carlo samples (Hutchinson probes, noise draws)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    """The sample mean and its standard error, std / sqrt(n) (nan for one sample).

    Args:
        samples: at least one number.

    Returns:
        (mean, stderr), summed with `math.fsum` (no loss of digits over many samples).
    """
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, float("nan")
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)
