"""Flatness of a model's loss at its current weights: the measures of the NSO paper.

With L(W) the mean loss over a fixed set of batches and H its Hessian over the measured parameters:
- `hessian_trace`: tr(H), Hutchinson's estimator E[z^T H z] with Rademacher probes z.
- `top_eigenvalue`: the eigenvalues of H largest in magnitude (power iteration, with deflation
  for the top n). At a minimum H is near positive semi-definite and these are the largest.
- `noise_stability`: E[L(W + U)] - L(W), U ~ N(0, sigma^2 I) = sigma^2/2 tr(H) + O(sigma^4).
- `pac_bayes_curvature`: sum over layers of v_l^T H_l v_l with v = W - W_init, the quantity in
  the paper's PAC-Bayes bound (H_l: the Hessian block of layer l's parameters).

Every measure:
- takes `batches`, dict batches with the loss `model(**batch).loss`, or any batches with a
  `loss_fn(model, batch)` (e.g. CLIP, whose batch has no labels);
- measures the trainable parameters (with peft: the adapters), or those picked by
  `parameters="all"` and the `include` / `exclude` regexes;
- leaves the model as found: `.grad` untouched (products use `torch.autograd.grad`), train/eval
  flags, `requires_grad` flags and attention implementation restored, weights bit-exact
  (perturbations are undone by copy from a backup, never by subtraction);
- draws its random vectors from its own generator (`seed`), never the global RNG;
- under torch.distributed averages across processes (see `nso_hf.hvp`), with the same random
  vectors on every process, so each process returns the same estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nso_hf.hvp import (
    HessianOperator,
    LossFn,
    mean_loss,
    prepare_measurement,
    select_measured_parameters,
)
from nso_hf.measurement import measurement_mode
from nso_hf.noise import clean_parameter_name


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of tr(H).

    value: mean of the probe samples z^T H z; stderr: their standard deviation / sqrt(num_probes)
    (nan with one probe); converged: the tolerance was met (None when no tolerance was asked).
    """

    value: float
    stderr: float
    num_probes: int
    num_parameters: int
    samples: list[float] = field(repr=False)
    converged: bool | None = None


@dataclass(frozen=True)
class EigenEstimate:
    """Eigenvalues of H by power iteration, largest magnitude first.

    residuals[i] = ||H v_i - lambda_i v_i|| for the unit vector v_i: H being symmetric, some
    eigenvalue lies within residuals[i] of values[i] (an error bound, not a standard error). For
    i > 0 it is the residual of the deflated operator P H P (P: away from the earlier vectors).
    """

    values: list[float]
    residuals: list[float]
    iterations: list[int]
    converged: list[bool]
    num_parameters: int

    @property
    def value(self) -> float:
        """The top eigenvalue."""
        return self.values[0]

    @property
    def residual(self) -> float:
        """The top eigenvalue's residual bound."""
        return self.residuals[0]


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


@dataclass(frozen=True)
class PacBayesCurvature:
    """v^T H v terms for v = W - W_init.

    per_layer: v_l^T H_ll v_l for each parameter tensor l (H_ll: H's diagonal block for l);
    total: their sum (the paper's quantity); full: v^T H v over all parameters, cross-layer
    terms included; displacement_norm: ||v||.
    """

    total: float
    per_layer: dict[str, float]
    full: float
    displacement_norm: float
    num_parameters: int


# --- vector arithmetic and draws -----------------------------------------------------------------------------


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    # float64 accumulation: a sum over millions of terms loses digits in float32.
    return float(sum((x.double() * y.double()).sum().cpu() for x, y in zip(a, b)))


def _draw(
    params: Sequence[torch.Tensor], gens: dict[torch.device, torch.Generator], seed: int, kind: str
) -> list[torch.Tensor]:
    """A random vector shaped like `params`: "rademacher" (+-1) or "normal" (N(0, 1)).

    One generator per device, seeded with `seed`: the draws do not depend on the global RNG and are
    the same on every process.
    """
    out = []
    for p in params:
        gen = gens.get(p.device)
        if gen is None:
            gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        t = torch.empty_like(p, memory_format=torch.contiguous_format)
        if kind == "rademacher":
            t.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        else:
            t.normal_(generator=gen)
        out.append(t)
    return out


def _mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, float("nan")
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)


# --- measures ---------------------------------------------------------------------------------


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Any],
    num_probes: int = 100,
    *,
    tolerance: float | None = None,
    min_probes: int = 10,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    reuse_graph: bool | None = None,
) -> TraceEstimate:
    """tr(H) by Hutchinson's estimator with Rademacher probes: E[z^T H z] = tr(H), z_i = +-1.

    Args:
        model: the model to measure.
        batches: the batches L is the mean loss of (iterated once and held).
        num_probes: the most probes to draw; each costs one Hessian-vector product.
        tolerance: stop early once stderr <= tolerance * |value| (after `min_probes` probes).
        min_probes: probes drawn before the tolerance is checked.
        loss_fn: `loss_fn(model, batch) -> scalar loss`; default `model(**batch).loss`.
        parameters: "trainable" or "all"; then filtered by `include` / `exclude` regexes.
        seed: seed of the probes.
        reuse_graph: keep the gradient graph between probes (default: with a single batch).

    Returns:
        A `TraceEstimate`. The variance of one sample is 2 * sum_{i != j} H_ij^2, so the stderr
        shrinks as 1/sqrt(num_probes).
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
    if tolerance is not None and tolerance <= 0:
        raise ValueError(f"tolerance must be > 0 (or None for no early stop), got {tolerance}.")
    model, named, batch_list = prepare_measurement(model, batches, parameters, include, exclude)
    params = [p for _, p in named]
    samples: list[float] = []
    converged = None if tolerance is None else False
    gens: dict = {}
    with measurement_mode(model, params):
        op = HessianOperator(model, params, batch_list, loss_fn, reuse_graph)
        try:
            for _ in range(num_probes):
                z = _draw(params, gens, seed, "rademacher")
                samples.append(_dot(z, op.matvec(z)))
                if tolerance is not None and len(samples) >= max(min_probes, 2):
                    mean, err = _mean_stderr(samples)
                    if err <= tolerance * abs(mean):
                        converged = True
                        break
        finally:
            op.release()
    value, stderr = _mean_stderr(samples)
    return TraceEstimate(
        value=value, stderr=stderr, num_probes=len(samples), num_parameters=sum(p.numel() for p in params),
        samples=samples, converged=converged,
    )


def top_eigenvalue(
    model: nn.Module,
    batches: Iterable[Any],
    max_iter: int = 100,
    *,
    top_n: int = 1,
    tolerance: float = 1e-4,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    reuse_graph: bool | None = None,
) -> EigenEstimate:
    """The `top_n` eigenvalues of H of largest magnitude, by power iteration with deflation.

    Iteration: v <- P H v / ||P H v||, with P the projection away from the eigenvectors already
    found (so the n-th run sees the rest of the spectrum); lambda = v^T H v (Rayleigh quotient).
    It stops when lambda changes by less than `tolerance` * |lambda| between iterations. The error
    of lambda shrinks as (lambda_2 / lambda_1)^(2k): a small spectral gap needs more iterations.

    Args:
        model, batches, loss_fn, parameters, include, exclude, seed, reuse_graph: as in `hessian_trace`.
        max_iter: the most Hessian-vector products per eigenvalue.
        top_n: how many eigenvalues.
        tolerance: relative change of lambda that counts as converged.

    Returns:
        An `EigenEstimate`; `.value` is the top one. Note: power iteration finds the eigenvalue
        largest in magnitude; away from a minimum that can be a negative one.
    """
    if max_iter < 1 or top_n < 1:
        raise ValueError(f"max_iter and top_n must be >= 1, got max_iter={max_iter}, top_n={top_n}.")
    model, named, batch_list = prepare_measurement(model, batches, parameters, include, exclude)
    params = [p for _, p in named]
    values, residuals, iterations, converged = [], [], [], []
    eigvecs: list[list[torch.Tensor]] = []
    gens: dict = {}

    def project(v: list[torch.Tensor]) -> None:
        for u in eigvecs:
            c = _dot(u, v)
            for x, y in zip(v, u):
                x.sub_(y, alpha=c)

    def normalise(v: list[torch.Tensor]) -> float:
        norm = math.sqrt(_dot(v, v))
        if norm > 0:
            for x in v:
                x.div_(norm)
        return norm

    with measurement_mode(model, params):
        op = HessianOperator(model, params, batch_list, loss_fn, reuse_graph)
        try:
            for _ in range(top_n):
                v = _draw(params, gens, seed, "normal")
                project(v)
                normalise(v)
                lam_prev, lam, residual, done, it = None, 0.0, float("nan"), False, 0
                for it in range(1, max_iter + 1):
                    hv = op.matvec(v)
                    project(hv)
                    lam = _dot(v, hv)
                    # ||Hv - lam v||, computed directly: ||Hv||^2 - lam^2 cancels catastrophically.
                    residual = math.sqrt(
                        sum(float((h.double() - lam * x.double()).square().sum()) for h, x in zip(hv, v))
                    )
                    done = lam_prev is not None and abs(lam - lam_prev) <= tolerance * max(abs(lam_prev), 1e-30)
                    lam_prev = lam
                    if normalise(hv) == 0:  # v is in H's null space (on the complement): eigenvalue 0
                        done = True
                        break
                    v = hv
                    if done:
                        break
                # The next runs are projected away from this (unit) vector.
                eigvecs.append(v)
                values.append(lam)
                residuals.append(residual)
                iterations.append(it)
                converged.append(done)
        finally:
            op.release()
    return EigenEstimate(
        values=values, residuals=residuals, iterations=iterations, converged=converged,
        num_parameters=sum(p.numel() for p in params),
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

    By Taylor expansion this is sigma^2/2 * tr(H) + O(sigma^4): what NSO's training loss adds.
    Forward passes only (no gradients); costs 1 + num_draws * (2 if antithetic else 1) loss
    evaluations over the batches, and two parameter-sized copies (backup and noise).

    Args:
        model, batches, loss_fn, parameters, include, exclude, seed: as in `hessian_trace`.
        sigma: standard deviation of each noise entry (absolute, the same for every tensor).
        num_draws: number of draws of U.
        antithetic: evaluate at W + U and W - U and average (the first-order term cancels).

    Returns:
        A `NoiseStabilityEstimate`; weights are restored bit-exactly.
    """
    if num_draws < 1 or sigma < 0:
        raise ValueError(f"num_draws must be >= 1 and sigma >= 0, got num_draws={num_draws}, sigma={sigma}.")
    model, named, batch_list = prepare_measurement(model, batches, parameters, include, exclude)
    params = [p for _, p in named]
    samples: list[float] = []
    gens: dict = {}
    with measurement_mode(model, params), torch.no_grad():
        base = mean_loss(model, batch_list, loss_fn)
        backup = [p.detach().clone() for p in params]
        try:
            for _ in range(num_draws):
                noise = _draw(params, gens, seed, "normal")
                for p, b, u in zip(params, backup, noise):
                    p.copy_(b).add_(u, alpha=sigma)
                plus = mean_loss(model, batch_list, loss_fn)
                if antithetic:
                    for p, b, u in zip(params, backup, noise):
                        p.copy_(b).sub_(u, alpha=sigma)
                    minus = mean_loss(model, batch_list, loss_fn)
                    samples.append(0.5 * (plus + minus) - base)
                else:
                    samples.append(plus - base)
        finally:
            # Restore by copy: in low precision W + U - U != W.
            for p, b in zip(params, backup):
                p.copy_(b)
    value, stderr = _mean_stderr(samples)
    return NoiseStabilityEstimate(
        value=value, stderr=stderr, num_draws=num_draws, sigma=sigma, base_loss=base, antithetic=antithetic,
        num_parameters=sum(p.numel() for p in params), samples=samples,
    )


def snapshot_parameters(
    model: nn.Module,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the measured parameters, by name: W_init for `pac_bayes_curvature`.

    Take it before training (e.g. right after `get_peft_model`, for the adapters at init).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    named = select_measured_parameters(model, parameters, include, exclude)
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def pac_bayes_curvature(
    model: nn.Module,
    batches: Iterable[Any],
    init: Mapping[str, torch.Tensor] | nn.Module,
    *,
    loss_fn: LossFn | None = None,
    parameters: str = "trainable",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    reuse_graph: bool | None = None,
) -> PacBayesCurvature:
    """sum_l v_l^T H_ll v_l with v = W - W_init, per layer and in total, and the full v^T H v.

    Exact (no sampling): one Hessian-vector product for the full form, and one backward per
    parameter tensor per batch for the layer terms (all sharing one gradient graph per batch).

    Args:
        model, batches, loss_fn, parameters, include, exclude, reuse_graph: as in `hessian_trace`.
        init: W_init, a name -> tensor mapping (`snapshot_parameters`) or a module with the same
            parameter names (e.g. the pretrained model before fine-tuning).

    Returns:
        A `PacBayesCurvature`.

    Raises:
        ValueError: a measured parameter is missing from `init` or has another shape.
    """
    model, named, batch_list = prepare_measurement(model, batches, parameters, include, exclude)
    if isinstance(init, nn.Module):
        init = {clean_parameter_name(n): p for n, p in init.named_parameters(remove_duplicate=False)}
    missing = [n for n, p in named if n not in init or tuple(init[n].shape) != tuple(p.shape)]
    if missing:
        raise ValueError(
            f"init has no tensor of the right shape for {len(missing)} measured parameter(s), e.g. {missing[:3]}. "
            "Pass the initial model, or snapshot_parameters(model) taken before training with the same selection."
        )
    params = [p for _, p in named]
    with torch.no_grad():
        v = [p.detach() - init[n].detach().to(device=p.device, dtype=p.dtype) for n, p in named]
    with measurement_mode(model, params):
        op = HessianOperator(model, params, batch_list, loss_fn, reuse_graph)
        try:
            blocks = op.block_quadratic_forms(v)
            full = _dot(v, op.matvec(v))
        finally:
            op.release()
    per_layer = {n: b for (n, _), b in zip(named, blocks)}
    return PacBayesCurvature(
        total=math.fsum(blocks), per_layer=per_layer, full=full, displacement_norm=math.sqrt(_dot(v, v)),
        num_parameters=sum(p.numel() for p in params),
    )


__all__ = [
    "EigenEstimate",
    "NoiseStabilityEstimate",
    "PacBayesCurvature",
    "TraceEstimate",
    "hessian_trace",
    "noise_stability",
    "pac_bayes_curvature",
    "snapshot_parameters",
    "top_eigenvalue",
]
