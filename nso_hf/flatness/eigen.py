"""The eigenvalues of H largest in magnitude, by power iteration with deflation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nso_hf.flatness.context import LossFn, Measurement
from nso_hf.flatness.hvp import hessian_operator


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


def estimate_top_eigenvalues(
    m: Measurement,
    max_iter: int = 100,
    *,
    top_n: int = 1,
    tolerance: float = 1e-4,
    seed: int = 0,
    hvp: str = "auto",
    reuse_graph: bool | None = None,
    relative_step: float | None = None,
) -> EigenEstimate:
    """The `top_n` eigenvalues of H of largest magnitude on an entered `Measurement`.

    Iteration: v <- P H v / ||P H v||, with P the projection away from the eigenvectors already
    found (so the n-th run sees the rest of the spectrum); lambda = v^T H v (Rayleigh quotient).
    It stops when lambda changes by less than `tolerance` * |lambda| between iterations, or when the
    residual bound ||Hv - lambda v|| is below `tolerance` * |lambda| (an eigenvalue is then that
    close). The error of lambda shrinks as (lambda_2 / lambda_1)^(2k): a small spectral gap needs
    more iterations. With finite differences each product carries the error of
    `finite_difference_step`, which makes lambda jitter from one iteration to the next at that
    level: the residual test is what stops the iteration there.

    Args:
        m: the measurement.
        max_iter: the most Hessian-vector products per eigenvalue.
        top_n: how many eigenvalues.
        tolerance: relative change of lambda that counts as converged.
        seed, hvp, reuse_graph, relative_step: as in `nso_hf.flatness.trace.estimate_trace`.

    Returns:
        An `EigenEstimate`; `.value` is the top one. Power iteration finds the eigenvalue largest in
        magnitude; away from a minimum that can be a negative one.

    Raises:
        ValueError: max_iter or top_n < 1, or an unknown `hvp`.
    """
    if max_iter < 1 or top_n < 1:
        raise ValueError(f"max_iter and top_n must be >= 1, got max_iter={max_iter}, top_n={top_n}.")
    op = hessian_operator(m, hvp, reuse_graph=reuse_graph, relative_step=relative_step)
    values, residuals, iterations, converged = [], [], [], []
    eigvecs: list[list[torch.Tensor]] = []
    gens: dict = {}

    def project(v: list[torch.Tensor]) -> None:
        for u in eigvecs:
            c = m.dot(u, v)
            for x, y in zip(v, u):
                x.sub_(y.to(x.dtype), alpha=c)

    def normalise(v: list[torch.Tensor]) -> float:
        norm = m.norm(v)
        if norm > 0:
            for x in v:
                x.div_(norm)
        return norm

    try:
        for _ in range(top_n):
            v = m.random_vector(gens, seed, "normal", op.vector_dtype)
            project(v)
            normalise(v)
            lam_prev, lam, residual, done, it = None, 0.0, float("nan"), False, 0
            for it in range(1, max_iter + 1):  # noqa: B007  (`it` is read after the loop: iterations used)
                hv = op.matvec(v)
                project(hv)
                lam = m.dot(v, hv)
                # ||Hv - lam v||, computed directly: ||Hv||^2 - lam^2 cancels catastrophically.
                r = [h.double() - lam * x.double() for h, x in zip(hv, v)]
                residual = m.norm(r)
                del r
                settled = lam_prev is not None and abs(lam - lam_prev) <= tolerance * max(abs(lam_prev), 1e-30)
                done = settled or residual <= tolerance * abs(lam)
                lam_prev = lam
                if normalise(hv) == 0:  # v is in H's null space (on the complement): eigenvalue 0
                    done = True
                    break
                v = [h.to(x.dtype) for h, x in zip(hv, v)]
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
        num_parameters=m.num_parameters,
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
    hvp: str = "auto",
    relative_step: float | None = None,
) -> EigenEstimate:
    """The `top_n` eigenvalues of H of largest magnitude, by power iteration with deflation.

    Args:
        model, batches, loss_fn, parameters, include, exclude, seed, reuse_graph, hvp, relative_step:
            as in `nso_hf.flatness.hessian_trace` (finite differences by default since 0.2).
        max_iter: the most Hessian-vector products per eigenvalue.
        top_n: how many eigenvalues.
        tolerance: relative change of lambda that counts as converged.

    Returns:
        An `EigenEstimate` (see `estimate_top_eigenvalues`); the model is left as found.
    """
    with Measurement(model, batches, loss_fn=loss_fn, parameters=parameters, include=include, exclude=exclude) as m:
        return estimate_top_eigenvalues(
            m, max_iter, top_n=top_n, tolerance=tolerance, seed=seed, hvp=hvp, reuse_graph=reuse_graph,
            relative_step=relative_step,
        )
