"""Every flatness measure of one model as one JSON-ready dict (what `scripts/measure_flatness.py` writes).

Cost, in Hessian-vector products (each about 2-3 backward passes per batch): num_probes for the
trace, up to top_n * max_iter for the eigenvalues, 1 + (number of parameter tensors) backward
passes per batch for the PAC-Bayes terms; and in forward passes: 1 + 2 * num_draws for noise
stability, curve_points (+ surface_points^2) for the landscape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from nso_hf.flatness import hessian_trace, noise_stability, pac_bayes_curvature, top_eigenvalue
from nso_hf.hvp import LossFn
from nso_hf.landscape import loss_curve, loss_surface

REPORT_KEYS = (
    "num_parameters_measured",
    "loss",
    "hessian_trace",
    "top_eigenvalues",
    "noise_stability",
    "pac_bayes_curvature",
    "landscape_1d",
    "landscape_2d",
)


@dataclass(frozen=True)
class ReportSettings:
    """How much work each measure gets (see each function in `nso_hf.flatness` / `nso_hf.landscape`)."""

    num_probes: int = 50
    max_iter: int = 50
    top_n: int = 1
    sigma: float = 0.01
    num_draws: int = 20
    radius: float = 1.0
    curve_points: int = 21
    surface_points: int = 0  # 0: no 2-D surface
    seed: int = 0


def grid(radius: float, points: int) -> list[float]:
    """`points` evenly spaced values in [-radius, radius] (0 included when `points` is odd)."""
    if points < 2:
        raise ValueError(f"A landscape needs at least 2 points per axis, got {points}.")
    return torch.linspace(-radius, radius, points, dtype=torch.float64).tolist()


def flatness_report(
    model: nn.Module,
    batches: Sequence[Any],
    settings: ReportSettings,
    init: Mapping[str, torch.Tensor] | nn.Module | None = None,
    loss_fn: LossFn | None = None,
) -> dict[str, Any]:
    """All measures of `model` on `batches`, keyed by `REPORT_KEYS`.

    Args:
        model: the model (measured parameters: the trainable ones; with peft, the adapters).
        batches: the fixed batches.
        settings: the work per measure.
        init: W_init for the PAC-Bayes quantity; None leaves that entry None.
        loss_fn: as in `nso_hf.flatness.hessian_trace`.

    Returns:
        A dict of plain numbers and lists (json.dump-able); the model is left as found.
    """
    trace = hessian_trace(model, batches, settings.num_probes, loss_fn=loss_fn, seed=settings.seed)
    eig = top_eigenvalue(model, batches, settings.max_iter, top_n=settings.top_n, loss_fn=loss_fn, seed=settings.seed)
    noise = noise_stability(model, batches, settings.sigma, settings.num_draws, loss_fn=loss_fn, seed=settings.seed)
    alphas = grid(settings.radius, settings.curve_points)
    curve = loss_curve(model, batches, alphas, loss_fn=loss_fn, seed=settings.seed)
    surface = None
    if settings.surface_points:
        axis = grid(settings.radius, settings.surface_points)
        surface = asdict(loss_surface(model, batches, axis, axis, loss_fn=loss_fn, seed=settings.seed))
    curvature = None
    if init is not None:
        curvature = asdict(pac_bayes_curvature(model, batches, init, loss_fn=loss_fn))
    return {
        "num_parameters_measured": trace.num_parameters,
        "loss": noise.base_loss,
        "hessian_trace": {"value": trace.value, "stderr": trace.stderr, "num_probes": trace.num_probes},
        "top_eigenvalues": {k: v for k, v in asdict(eig).items() if k != "num_parameters"},
        "noise_stability": {k: v for k, v in asdict(noise).items() if k not in ("samples", "num_parameters")},
        "pac_bayes_curvature": curvature,
        "landscape_1d": asdict(curve),
        "landscape_2d": surface,
    }
