"""The loss along random filter-normalised directions (Li, Xu, Taylor, Studer, Goldstein, NeurIPS 2018).

A random direction d ~ N(0, I) is rescaled filter by filter (a filter: one slice along dim 0 of a
weight, i.e. one output row of a linear layer or one output channel of a convolution) to the norm
of the same filter of the weights: d_i <- d_i * ||W_i|| / ||d_i||. The scale of the weights then
drops out, so the curves of two checkpoints (or two layers of different scale) can be compared:
alpha = 1 moves every filter by its own norm. One-dimensional tensors (biases, norm scales) get no
displacement by default, as in the paper.

The directions are drawn on the CPU from their own seeded generator: for one architecture and one
seed, every checkpoint gets the same raw direction, normalised to its own filters. Every point is
set by the measurement's `Perturbation.move_to` (W + a d1 + b d2, from the backup) and W is
restored by copy; the loss runs with the model's own attention kernel (forward passes only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nso_hf.flatness.context import LossFn, Measurement, mean_loss
from nso_hf.noise import Perturbation


@dataclass(frozen=True)
class LossCurve:
    """losses[i] = L(W + alphas[i] * d)."""

    alphas: list[float]
    losses: list[float]


@dataclass(frozen=True)
class LossSurface:
    """losses[i][j] = L(W + alphas[i] * d1 + betas[j] * d2)."""

    alphas: list[float]
    betas: list[float]
    losses: list[list[float]]


def filter_normalized_direction(
    params: Sequence[torch.Tensor], seed: int = 0, include_1d: bool = False
) -> list[torch.Tensor]:
    """A random direction shaped like `params`, each filter scaled to the norm of the weights' filter.

    Args:
        params: the weights W (one tensor per parameter).
        seed: seed of the CPU generator the Gaussian direction is drawn from.
        include_1d: also move 1-D tensors (normalised as one filter); default: zero for them.

    Returns:
        One tensor per parameter, on its device and in its dtype. A filter of zero norm (e.g. a
        LoRA B at initialisation) gets a zero direction.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        # Drawn for every tensor, even a zeroed one, so that each tensor's draw does not depend on include_1d.
        d = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        w = p.detach().to("cpu", torch.float32)
        if p.dim() <= 1:
            if include_1d:
                d.mul_(w.norm() / d.norm().clamp_min(1e-12))
            else:
                d.zero_()
        else:
            dims = tuple(range(1, p.dim()))
            d.mul_(w.norm(dim=dims, keepdim=True) / d.norm(dim=dims, keepdim=True).clamp_min(1e-12))
        out.append(d.to(device=p.device, dtype=p.dtype))
    return out


def measurement_directions(m: Measurement, seed: int, include_1d: bool = False) -> list[torch.Tensor]:
    """`filter_normalized_direction` of a measurement's weights, as local shards when sharded.

    The filters' norms are those of the whole weights (gathered, one tensor at a time, when sharded),
    so a sharded model gets the direction of the same model unsharded.
    """
    full = filter_normalized_direction([m.full(p) for p in m.params], seed, include_1d)
    return [m.shard(p, d) for p, d in zip(m.params, full)]


def losses_at_offsets(
    m: Measurement, directions: Sequence[Sequence[torch.Tensor]], coordinates: Sequence[Sequence[float]]
) -> list[float]:
    """L(W + sum_k c_k d_k) for each row c of `coordinates`, on an entered `Measurement`.

    Args:
        m: the measurement.
        directions: the directions d_k, each one tensor per measured parameter (local shards).
        coordinates: one row of len(directions) coefficients per point.

    Returns:
        The mean batch loss at each point (averaged across processes); W is restored by copy.

    Raises:
        ValueError: a row's length differs from the number of directions.
    """
    for row in coordinates:
        if len(row) != len(directions):
            raise ValueError(f"A point has {len(row)} coordinates for {len(directions)} directions.")
    pert = m.perturbation
    losses = []
    try:
        for row in coordinates:
            pert.move_to(row, directions)
            losses.append(m.loss())
    finally:
        pert.restore()  # by copy: in low precision W + a d - a d != W
    return losses


def loss_at_offsets(
    model: nn.Module,
    batches: Sequence[Any],
    params: Sequence[torch.Tensor],
    directions: Sequence[Sequence[torch.Tensor]],
    coordinates: Sequence[Sequence[float]],
    loss_fn: LossFn | None = None,
) -> list[float]:
    """L(W + sum_k c_k d_k) for each row c of `coordinates`; the weights are restored bit-exactly.

    The 0.1 form, for a model already in measurement state; `losses_at_offsets` is the same on a
    `Measurement`. Both move the weights with `Perturbation.move_to`.

    Args:
        model: the model, already in measurement state (eval mode).
        batches: batches on the model's input device.
        params: the weights W that move.
        directions: the directions d_k, each one tensor per parameter.
        coordinates: one row of len(directions) coefficients per point.

    Returns:
        The mean batch loss at each point (averaged across processes when distributed).
    """
    for row in coordinates:
        if len(row) != len(directions):
            raise ValueError(f"A point has {len(row)} coordinates for {len(directions)} directions.")
    pert = Perturbation(params, sigma=0.0, relative=False)
    losses = []
    try:
        for row in coordinates:
            pert.move_to(row, directions)
            losses.append(mean_loss(model, batches, loss_fn))
    finally:
        pert.restore()
    return losses


def evaluate_loss_curve(
    m: Measurement, alphas: Sequence[float], *, seed: int = 0, include_1d: bool = False
) -> LossCurve:
    """L(W + alpha * d) for each alpha, d a filter-normalised direction, on an entered `Measurement`."""
    d = measurement_directions(m, seed, include_1d)
    losses = losses_at_offsets(m, [d], [[a] for a in alphas])
    return LossCurve(alphas=[float(a) for a in alphas], losses=losses)


def evaluate_loss_surface(
    m: Measurement, alphas: Sequence[float], betas: Sequence[float], *, seed: int = 0, include_1d: bool = False
) -> LossSurface:
    """L(W + alpha d1 + beta d2) on the grid, d1, d2 from seeds `seed`, `seed + 1`, on an entered `Measurement`."""
    d1 = measurement_directions(m, seed, include_1d)
    d2 = measurement_directions(m, seed + 1, include_1d)
    flat = losses_at_offsets(m, [d1, d2], [[a, b] for a in alphas for b in betas])
    n = len(betas)
    return LossSurface(
        alphas=[float(a) for a in alphas], betas=[float(b) for b in betas],
        losses=[flat[i * n : (i + 1) * n] for i in range(len(alphas))],
    )


def loss_curve(
    model: nn.Module,
    batches: Iterable[Any],
    alphas: Sequence[float],
    *,
    seed: int = 0,
    include_1d: bool = False,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> LossCurve:
    """The loss along one random filter-normalised direction: L(W + alpha * d) for each alpha.

    Args:
        model, batches, loss_fn, parameters, include, exclude: as in `nso_hf.flatness.hessian_trace`.
        alphas: the step sizes (alpha = 1 moves every filter by its own norm).
        seed: seed of the direction.
        include_1d: also move 1-D tensors.

    Returns:
        A `LossCurve`; the model is left as found.
    """
    with Measurement(model, batches, loss_fn=loss_fn, parameters=parameters, include=include, exclude=exclude) as m:
        return evaluate_loss_curve(m, alphas, seed=seed, include_1d=include_1d)


def loss_surface(
    model: nn.Module,
    batches: Iterable[Any],
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    seed: int = 0,
    include_1d: bool = False,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> LossSurface:
    """The loss on the plane of two random filter-normalised directions (seeds `seed`, `seed + 1`).

    Two Gaussian directions in many dimensions are nearly orthogonal, so they are not
    orthogonalised (as in Li et al.). Costs len(alphas) * len(betas) loss evaluations.

    Returns:
        A `LossSurface`; the model is left as found.
    """
    with Measurement(model, batches, loss_fn=loss_fn, parameters=parameters, include=include, exclude=exclude) as m:
        return evaluate_loss_surface(m, alphas, betas, seed=seed, include_1d=include_1d)
