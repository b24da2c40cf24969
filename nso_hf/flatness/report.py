"""Every flatness measure of one model as one JSON-ready dict (what `scripts/measure_flatness.py` writes).

All measures run in one `Measurement`: the parameters are selected, the batches moved and the model
put in eval mode once; attention is switched to eager (once) only when the exact product is used
(`settings.hvp`).

Cost, in Hessian-vector products (finite differences: 2 forward+backward passes per batch each;
exact: about 3.5): num_probes for the trace, up to top_n * max_iter for the eigenvalues, and for the
PAC-Bayes terms 1 + (number of parameter tensors) products (exact: one backward per tensor instead);
in forward passes: 1 + 2 * num_draws for noise stability, curve_points (+ surface_points^2) for the
landscape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from nso_hf.flatness.context import LossFn, Measurement
from nso_hf.flatness.eigen import estimate_top_eigenvalues
from nso_hf.flatness.hvp import HVP_METHODS
from nso_hf.flatness.landscape import evaluate_loss_curve, evaluate_loss_surface
from nso_hf.flatness.noise_stability import estimate_noise_stability
from nso_hf.flatness.pac_bayes import estimate_pac_bayes_curvature
from nso_hf.flatness.trace import estimate_trace

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
    """How much work each measure gets (see each function in `nso_hf.flatness`).

    hvp: the Hessian-vector product of the trace, the eigenvalues and the PAC-Bayes terms.
    """

    num_probes: int = 50
    max_iter: int = 50
    top_n: int = 1
    sigma: float = 0.01
    num_draws: int = 20
    radius: float = 1.0
    curve_points: int = 21
    surface_points: int = 0  # 0: no 2-D surface
    seed: int = 0
    hvp: str = "auto"

    def __post_init__(self) -> None:
        if self.hvp not in HVP_METHODS:
            raise ValueError(f"ReportSettings.hvp={self.hvp!r} is not one of {HVP_METHODS}.")


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
    alphas = grid(settings.radius, settings.curve_points)
    axis = grid(settings.radius, settings.surface_points) if settings.surface_points else None
    seed, hvp = settings.seed, settings.hvp
    with Measurement(model, batches, loss_fn=loss_fn) as m:
        trace = estimate_trace(m, settings.num_probes, seed=seed, hvp=hvp)
        eig = estimate_top_eigenvalues(m, settings.max_iter, top_n=settings.top_n, seed=seed, hvp=hvp)
        noise = estimate_noise_stability(m, settings.sigma, settings.num_draws, seed=seed)
        curve = evaluate_loss_curve(m, alphas, seed=seed)
        surface = None if axis is None else asdict(evaluate_loss_surface(m, axis, axis, seed=seed))
        curvature = None if init is None else asdict(estimate_pac_bayes_curvature(m, init, hvp=hvp))
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
