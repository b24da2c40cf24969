"""Which sigma? Measure the loss increase under noise over a grid and recommend one, in seconds.

NSO trains on E[L(W + U)], U ~ N(0, sigma^2 I), which exceeds L(W) by about sigma^2/2 tr(H): that
gap is the flatness penalty. Too small a sigma makes it negligible (NSO is then plain training at
twice the cost); too large a sigma makes it dominate, and the gradients at W +- U are those of other
models. The rule: **the largest sigma on the grid whose loss increase E[L(W + U)] - L(W) is at most
`target` times L(W)** at the weights training starts from (default 5%: the penalty is a small, set
share of the objective). The rule was fixed before the comparison of docs/results.md, which checks
it against the sigma the validation sweep picks.

Measured with `nso_hf.flatness.estimate_noise_stability` (antithetic draws, the same noise as NSO's
`noise_scale="absolute"` on the trainable parameters: with peft, the adapters), weights restored
bit-exactly. It does not cover the relative noise of `flat_lora` / `nso_merged`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from nso_hf.flatness.context import LossFn, Measurement
from nso_hf.flatness.noise_stability import estimate_noise_stability

DEFAULT_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_TARGET = 0.05


@dataclass(frozen=True)
class SigmaSearch:
    """The loss increase at each grid sigma and the recommendation (None: even the smallest sigma costs too much)."""

    sigma: float | None
    target: float
    base_loss: float
    grid: list[float]
    increase: list[float]
    stderr: list[float]
    note: str

    @property
    def relative(self) -> list[float]:
        return [x / self.base_loss for x in self.increase]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative": self.relative}

    def table(self) -> str:
        """A Markdown table of the sweep, the recommended row marked."""
        lines = ["| sigma | E[L(W+U)] - L(W) | / L(W) |", "|---|---|---|"]
        for s, x, e, r in zip(self.grid, self.increase, self.stderr, self.relative):
            mark = " **<-**" if s == self.sigma else ""
            lines.append(f"| {s:g}{mark} | {x:.4g} ± {e:.2g} | {100 * r:.2f}% |")
        return "\n".join(lines)


def recommend(grid: Sequence[float], increase: Sequence[float], base_loss: float, target: float) -> tuple[float | None, str]:
    """The rule on measured numbers: the largest sigma with increase <= target * base_loss."""
    allowed = [s for s, x in zip(grid, increase) if x <= target * base_loss]
    if not allowed:
        return None, f"every sigma raises the loss by more than {100 * target:g}%: try smaller values"
    best = max(allowed)
    if best == max(grid):
        return best, f"the largest sigma of the grid stays within {100 * target:g}%: larger values may be allowed too"
    return best, f"the largest sigma whose loss increase stays within {100 * target:g}% of the loss"


def find_sigma(
    model: nn.Module,
    batches: Iterable[Any],
    grid: Sequence[float] = DEFAULT_GRID,
    target: float = DEFAULT_TARGET,
    num_draws: int = 8,
    *,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
) -> SigmaSearch:
    """Loss increase under N(0, sigma^2) noise for each sigma of `grid`, and the recommended sigma.

    Costs one loss evaluation over `batches`, then 2 * num_draws per sigma (forward passes only).

    Args:
        model: the model as training will start (with peft: the fresh adapters).
        batches: a few training batches (dicts for `model(**batch).loss`, or anything `loss_fn` takes).
        grid: the sigmas tried (> 0).
        target: the largest loss increase allowed, as a fraction of L(W) (> 0).
        num_draws: antithetic noise draws per sigma.
        loss_fn, parameters, include, exclude, seed: as in `nso_hf.flatness.noise_stability`.

    Raises:
        ValueError: an empty grid, a sigma <= 0 or not finite, target <= 0, num_draws < 1, or L(W) <= 0.
    """
    grid = sorted(float(s) for s in grid)
    if not grid or any(not (0 < s < float("inf")) for s in grid):
        raise ValueError(f"grid needs finite sigmas > 0, got {list(grid)}.")
    if not (0 < target < float("inf")) or num_draws < 1:
        raise ValueError(f"target must be finite and > 0 and num_draws >= 1, got target={target}, num_draws={num_draws}.")
    increase, stderr = [], []
    with Measurement(model, batches, loss_fn=loss_fn, parameters=parameters, include=include, exclude=exclude) as m:
        base = m.loss()
        if not base > 0:
            raise ValueError(f"The loss is {base}: a relative target needs a positive loss.")
        for sigma in grid:
            estimate = estimate_noise_stability(m, sigma, num_draws, seed=seed, base_loss=base)
            increase.append(estimate.value)
            stderr.append(estimate.stderr)
    sigma, note = recommend(grid, increase, base, target)
    return SigmaSearch(sigma, target, base, grid, increase, stderr, note)
