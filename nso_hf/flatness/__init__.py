"""Flatness of a model's loss at its current weights: the measures of the NSO paper.

With L(W) the mean loss over a fixed set of batches and H its Hessian over the measured parameters:
- `hessian_trace`: tr(H), Hutchinson's estimator E[z^T H z] with Rademacher probes z.
- `top_eigenvalue`: the eigenvalues of H largest in magnitude (power iteration, with deflation
  for the top n). At a minimum H is near positive semi-definite and these are the largest.
- `noise_stability`: E[L(W + U)] - L(W), U ~ N(0, sigma^2 I) = sigma^2/2 tr(H) + O(sigma^4).
- `pac_bayes_curvature`: sum over layers of v_l^T H_l v_l with v = W - W_init, the quantity in
  the paper's PAC-Bayes bound (H_l: the Hessian block of layer l's parameters).
- `loss_curve` / `loss_surface`: the loss along random filter-normalised directions.
- `flatness_report`: all of them, `FlatnessCallback`: trace and eigenvalue during training.

Every measure:
- takes `batches`, dict batches with the loss `model(**batch).loss`, or any batches with a
  `loss_fn(model, batch)` (e.g. CLIP, whose batch has no labels);
- measures the trainable parameters (with peft: the adapters), or those picked by
  `parameters="all"` and the `include` / `exclude` regexes;
- leaves the model as found: `.grad` untouched, train/eval flags, `requires_grad` flags and
  attention implementation restored, weights bit-exact (every move goes through
  `nso_hf.noise.Perturbation`, undone by copy from a backup, never by subtraction);
- draws its random vectors from its own generator (`seed`), never the global RNG;
- under torch.distributed averages across processes, with the same random vectors on every process,
  so each process returns the same estimate; FSDP2-sharded models are measured shard by shard.

Each `name(model, batches, ...)` enters a `Measurement` and calls its estimator on it; to run several
estimators on one model, enter one `Measurement` and call the estimators (`estimate_trace`,
`estimate_top_eigenvalues`, `estimate_noise_stability`, `estimate_pac_bayes_curvature`,
`evaluate_loss_curve`, `evaluate_loss_surface`) on it: selection, batch moves and mode switches
happen once.

The Hessian-vector product of the trace and the eigenvalues is, by default since 0.2 (`hvp="auto"`),
a central finite difference of two gradients for float32/float64 weights and the exact
double-backward product of 0.1 for 16-bit weights; `hvp="finite_difference"` / `hvp="exact"` force
one (see `nso_hf.flatness.hvp`). `pac_bayes_curvature` keeps the exact product by default.

Layout, one concept per file: `context` (Measurement, parameter selection, batches, loss,
distributed reduction), `mode` (eval mode and the attention switch), `hvp` (the two products),
`trace`, `eigen`, `noise_stability`, `pac_bayes`, `landscape`, `report`, `callback`
(`FlatnessCallback`, imports transformers), `checkpoints` (`load_checkpoint`), `final` (the scripts' end-of-run
measures and their options), `plot`
(`plot_landscapes`, needs matplotlib), `statistics`.
"""

from __future__ import annotations

from typing import Any

from nso_hf.flatness.context import Measurement, select_measured_parameters
from nso_hf.flatness.eigen import EigenEstimate, estimate_top_eigenvalues, top_eigenvalue
from nso_hf.flatness.hvp import (
    HVP_METHODS,
    FiniteDifferenceHessian,
    HessianOperator,
    finite_difference_step,
    hessian_operator,
)
from nso_hf.flatness.landscape import (
    LossCurve,
    LossSurface,
    evaluate_loss_curve,
    evaluate_loss_surface,
    filter_normalized_direction,
    loss_curve,
    loss_surface,
)
from nso_hf.flatness.noise_stability import NoiseStabilityEstimate, estimate_noise_stability, noise_stability
from nso_hf.flatness.pac_bayes import (
    PacBayesCurvature,
    estimate_pac_bayes_curvature,
    pac_bayes_curvature,
    snapshot_parameters,
)
from nso_hf.flatness.report import ReportSettings, flatness_report
from nso_hf.flatness.trace import TraceEstimate, estimate_trace, hessian_trace

# Imported on first use: the callback pulls in transformers' Trainer machinery, the loader
# transformers' model classes, the plot matplotlib (an optional dependency).
_LAZY = {
    "FlatnessCallback": "nso_hf.flatness.callback",
    "load_checkpoint": "nso_hf.flatness.checkpoints",
    "plot_landscapes": "nso_hf.flatness.plot",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HVP_METHODS",
    "EigenEstimate",
    "FiniteDifferenceHessian",
    "FlatnessCallback",
    "HessianOperator",
    "LossCurve",
    "LossSurface",
    "Measurement",
    "NoiseStabilityEstimate",
    "PacBayesCurvature",
    "ReportSettings",
    "TraceEstimate",
    "estimate_noise_stability",
    "estimate_pac_bayes_curvature",
    "estimate_top_eigenvalues",
    "estimate_trace",
    "evaluate_loss_curve",
    "evaluate_loss_surface",
    "filter_normalized_direction",
    "finite_difference_step",
    "flatness_report",
    "hessian_operator",
    "hessian_trace",
    "load_checkpoint",
    "loss_curve",
    "loss_surface",
    "noise_stability",
    "pac_bayes_curvature",
    "plot_landscapes",
    "select_measured_parameters",
    "snapshot_parameters",
    "top_eigenvalue",
]
