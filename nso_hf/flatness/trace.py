"""tr(H) by Hutchinson's estimator: E[z^T H z] = tr(H) for Rademacher probes z (entries +-1)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nso_hf.flatness.context import LossFn, Measurement
from nso_hf.flatness.hvp import hessian_operator
from nso_hf.flatness.statistics import mean_stderr


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


def estimate_trace(
    m: Measurement,
    num_probes: int = 100,
    *,
    tolerance: float | None = None,
    min_probes: int = 10,
    seed: int = 0,
    hvp: str = "auto",
    reuse_graph: bool | None = None,
    relative_step: float | None = None,
) -> TraceEstimate:
    """tr(H) on an entered `Measurement`, by Hutchinson's estimator with Rademacher probes.

    Args:
        m: the measurement (model, parameters, batches, loss).
        num_probes: the most probes to draw; each costs one Hessian-vector product.
        tolerance: stop early once stderr <= tolerance * |value| (after `min_probes` probes).
        min_probes: probes drawn before the tolerance is checked.
        seed: seed of the probes (the same probes for either `hvp`, sharded or not).
        hvp: "auto" (finite differences, or the exact product for 16-bit weights; see
            `nso_hf.flatness.hvp.resolve_hvp`), "finite_difference" (two forward+backward passes per
            probe) or "exact" (double backward).
        reuse_graph: exact only: keep the gradient graph between probes (default: with a single batch).
        relative_step: finite differences only (see `nso_hf.flatness.hvp.finite_difference_step`).

    Returns:
        A `TraceEstimate`. The variance of one sample is 2 * sum_{i != j} H_ij^2, so the stderr
        shrinks as 1/sqrt(num_probes).

    Raises:
        ValueError: num_probes < 1, tolerance <= 0, or an unknown `hvp`.
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
    if tolerance is not None and tolerance <= 0:
        raise ValueError(f"tolerance must be > 0 (or None for no early stop), got {tolerance}.")
    op = hessian_operator(m, hvp, reuse_graph=reuse_graph, relative_step=relative_step)
    samples: list[float] = []
    converged = None if tolerance is None else False
    gens: dict = {}
    try:
        for _ in range(num_probes):
            z = m.random_vector(gens, seed, "rademacher", op.probe_dtype)
            samples.append(m.dot(z, op.matvec(z)))
            if tolerance is not None and len(samples) >= max(min_probes, 2):
                mean, err = mean_stderr(samples)
                if err <= tolerance * abs(mean):
                    converged = True
                    break
    finally:
        op.release()
    value, stderr = mean_stderr(samples)
    return TraceEstimate(
        value=value, stderr=stderr, num_probes=len(samples), num_parameters=m.num_parameters,
        samples=samples, converged=converged,
    )


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
    hvp: str = "auto",
    relative_step: float | None = None,
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
        reuse_graph: exact product only: keep the gradient graph between probes (default: with one batch).
        hvp: "auto" (the default since 0.2: finite differences, which need no double backward, run
            with any attention kernel and on sharded models; the exact product for 16-bit weights),
            "finite_difference", or "exact" (double backward, eager attention; the 0.1 behaviour).
        relative_step: finite differences only (see `nso_hf.flatness.hvp.finite_difference_step`).

    Returns:
        A `TraceEstimate` (see `estimate_trace`); the model is left as found.
    """
    with Measurement(model, batches, loss_fn=loss_fn, parameters=parameters, include=include, exclude=exclude) as m:
        return estimate_trace(
            m, num_probes, tolerance=tolerance, min_probes=min_probes, seed=seed, hvp=hvp,
            reuse_graph=reuse_graph, relative_step=relative_step,
        )
