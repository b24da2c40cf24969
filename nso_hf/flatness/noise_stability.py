"""Noise stability E[L(W + U)] - L(W), U ~ N(0, sigma^2 I): the quantity NSO's training loss adds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nso_hf.flatness.context import LossFn, Measurement
from nso_hf.flatness.statistics import mean_stderr
from nso_hf.noise import draw_seed


@dataclass(frozen=True)
class NoiseStabilityEstimate:
    """E[L(W + U)] - L(W) over `num_draws` draws of U ~ N(0, sigma^2 I).

    With `antithetic`, each draw contributes (L(W+U) + L(W-U))/2 - L(W), which removes the
    first-order term g^T U from every sample (same mean, smaller variance; 2 losses per draw).
    """

    value: float
    stderr: float
    num_draws: int
    sigma: float
    base_loss: float
    antithetic: bool
    num_parameters: int
    samples: list[float] = field(repr=False)


def estimate_noise_stability(
    m: Measurement,
    sigma: float = 0.01,
    num_draws: int = 20,
    *,
    antithetic: bool = True,
    seed: int = 0,
    base_loss: float | None = None,
) -> NoiseStabilityEstimate:
    """E[L(W + U)] - L(W) with U ~ N(0, sigma^2 I) on an entered `Measurement`'s parameters.

    By Taylor expansion this is sigma^2/2 * tr(H) + O(sigma^4). Forward passes only; costs
    1 + num_draws * (2 if antithetic else 1) loss evaluations over the batches. The noise is drawn
    by the measurement's `Perturbation` (`apply`): straight into the parameters, W - U as the
    reflection of W + U, W restored by copy; no noise buffer. The noise of tensor i in draw j comes
    from `draw_seed(seed, 0, 0, rank, j, i)`, rank 0 unless the parameters are sharded (each shard
    then gets its own noise, as in training).

    Args:
        m: the measurement.
        sigma: standard deviation of each noise entry (absolute, the same for every tensor).
        num_draws: number of draws of U.
        antithetic: evaluate at W + U and W - U and average (the first-order term cancels).
        seed: seed of the noise.
        base_loss: L(W), when the caller already has it (`m.loss()` at these weights): one loss
            evaluation fewer per call, e.g. over a grid of sigmas.

    Returns:
        A `NoiseStabilityEstimate`; weights are restored bit-exactly.

    Raises:
        ValueError: num_draws < 1 or sigma < 0.
    """
    if num_draws < 1 or sigma < 0:
        raise ValueError(f"num_draws must be >= 1 and sigma >= 0, got num_draws={num_draws}, sigma={sigma}.")
    rank = torch.distributed.get_rank() if m.sharded and torch.distributed.is_initialized() else 0
    pert = m.perturbation
    samples: list[float] = []
    base = m.loss() if base_loss is None else base_loss
    try:
        for j in range(num_draws):
            seeds = [draw_seed(seed, 0, 0, rank, j, i) for i in range(len(m.params))]
            pert.apply(+1, seeds, sigma=sigma)
            plus = m.loss()
            if antithetic:
                pert.apply(-1, seeds, sigma=sigma)  # reflection through W: no second draw
                samples.append(0.5 * (plus + m.loss()) - base)
            else:
                samples.append(plus - base)
    finally:
        pert.restore()  # by copy: in low precision W + U - U != W
    value, stderr = mean_stderr(samples)
    return NoiseStabilityEstimate(
        value=value, stderr=stderr, num_draws=num_draws, sigma=sigma, base_loss=base, antithetic=antithetic,
        num_parameters=m.num_parameters, samples=samples,
    )


def noise_stability(
    model: nn.Module,
    batches: Iterable[Any],
    sigma: float = 0.01,
    num_draws: int = 20,
    *,
    antithetic: bool = True,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
) -> NoiseStabilityEstimate:
    """E[L(W + U)] - L(W) with U ~ N(0, sigma^2 I) on the measured parameters.

    Args:
        model, batches, loss_fn, parameters, include, exclude, seed: as in `nso_hf.flatness.hessian_trace`.
        sigma: standard deviation of each noise entry (absolute, the same for every tensor).
        num_draws: number of draws of U.
        antithetic: evaluate at W + U and W - U and average (the first-order term cancels).

    Returns:
        A `NoiseStabilityEstimate` (see `estimate_noise_stability`); the model is left as found,
        and runs with its own attention kernel (forward passes need no double backward).
    """
    with Measurement(model, batches, loss_fn=loss_fn, parameters=parameters, include=include, exclude=exclude) as m:
        return estimate_noise_stability(m, sigma, num_draws, antithetic=antithetic, seed=seed)
