"""Mean ± std over seeds, and seed-paired differences with a t-interval: the statistics of a comparison.

Runs of two methods that share a seed share their LoRA initialisation, data order and evaluation
problems, so their difference varies less than either run; the interval is therefore taken over the
per-seed differences (a paired t-interval), never over two independent means. With n = 3 seeds the
t quantile is 4.30: an interval excludes 0 only for a difference about 2.5 times the per-seed
spread of the differences. That is the price of few seeds, stated beside every interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (n - 1) of per-seed values; std is nan for one value."""

    mean: float
    std: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences a_i - b_i with a two-sided t-interval at `confidence`."""

    mean: float
    std: float
    n: int
    low: float
    high: float
    confidence: float

    @property
    def verdict(self) -> str:
        """"higher" / "lower" when the interval excludes 0, else "tie" (also for n < 2: no interval)."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "tie"
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "tie"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample std of `values` (at least one)."""
    if not values:
        raise ValueError("summarize needs at least one value.")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return Summary(mean, std, n)


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t quantile t_{(1 + confidence) / 2, df} (scipy)."""
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, df))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The mean of a_i - b_i over paired seeds and its t-interval; the bounds are nan for one pair.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty sequences, got {len(a)} and {len(b)}.")
    summary = summarize([x - y for x, y in zip(a, b)])
    if summary.n < 2:
        return PairedDifference(summary.mean, summary.std, 1, float("nan"), float("nan"), confidence)
    half = t_quantile(confidence, summary.n - 1) * summary.std / math.sqrt(summary.n)
    return PairedDifference(summary.mean, summary.std, summary.n, summary.mean - half, summary.mean + half, confidence)
