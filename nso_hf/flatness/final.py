"""The flatness of a run's final weights, as a training script reports it: options, batches, measures.

`FlatnessArguments` are the command-line options both scripts share (`finetune_cot.py`,
`pretrain_clip.py`), so `scripts/compare_methods.py` asks any task for the same measures with the
same flags. `measure_flatness` takes the training loss at the final weights on a few fixed training
batches, then the measures asked for, over the trainable weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FlatnessArguments:
    """Flatness of the training loss at the end of training (every measure is off by default)."""

    hessian_trace_probes: int = field(
        default=0,
        metadata={
            "help": "Hutchinson probes for the Hessian trace of the training loss over the trainable weights at the "
            "end (0: skip). Needs nso_hf.flatness; costs one Hessian-vector product per probe."
        },
    )
    hessian_trace_batches: int = field(
        default=1, metadata={"help": "Training batches the flatness measures (trace, eigenvalue, noise stability) use."}
    )
    top_eigenvalue_iterations: int = field(
        default=0,
        metadata={"help": "Power iterations for the top Hessian eigenvalue of the training loss at the end (0: skip)."},
    )
    noise_stability_draws: int = field(
        default=0,
        metadata={
            "help": "Noise draws for the noise stability E[L(W+U)] - L(W) of the training loss at the end (0: skip); "
            "antithetic, 2 forward passes per draw."
        },
    )
    noise_stability_sigma: float = field(
        default=0.01, metadata={"help": "Std of the noise U of --noise_stability_draws (absolute, every trainable weight)."}
    )

    def __post_init__(self) -> None:
        if self.hessian_trace_batches < 1:
            raise ValueError(f"--hessian_trace_batches must be >= 1, got {self.hessian_trace_batches}.")
        for name in ("hessian_trace_probes", "top_eigenvalue_iterations", "noise_stability_draws"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if not (math.isfinite(self.noise_stability_sigma) and self.noise_stability_sigma > 0):
            raise ValueError(f"--noise_stability_sigma must be finite and > 0, got {self.noise_stability_sigma}.")

    @property
    def wants_flatness(self) -> bool:
        """Whether any measure was asked for."""
        return bool(self.hessian_trace_probes or self.top_eigenvalue_iterations or self.noise_stability_draws)


def flatness_batches(rows: Any, collator: Any, batch_size: int, num_batches: int) -> list:
    """The first `num_batches` batches of `rows` (indexable), collated: the loss every measure is taken of."""
    batches = []  # the measures move them to the model's device
    for b in range(num_batches):
        chunk = [rows[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(rows)))]
        if chunk:
            batches.append(collator(chunk))
    return batches


def measure_flatness(model: Any, batches: list, args: FlatnessArguments, seed: int) -> dict[str, Any]:
    """The training loss at the final weights and the flatness measures asked for, over the trainable weights.

    Returns:
        {"batches", "loss", "hessian_trace", "top_eigenvalue", "noise_stability"}; a measure not asked
        for is None. The trace falls as the model grows confident whatever the method, so it is
        reported beside `loss`, and noise stability also relative to it (`relative`: the loss
        increase / the loss).
    """
    from nso_hf.flatness import Measurement, estimate_noise_stability, estimate_top_eigenvalues, estimate_trace

    result: dict[str, Any] = {"batches": len(batches), "hessian_trace": None, "top_eigenvalue": None, "noise_stability": None}
    with Measurement(model, batches) as m:
        result["loss"] = m.loss()
        if args.hessian_trace_probes > 0:
            t = estimate_trace(m, args.hessian_trace_probes, seed=seed)
            result["hessian_trace"] = {"value": t.value, "stderr": t.stderr, "num_probes": t.num_probes}
        if args.top_eigenvalue_iterations > 0:
            e = estimate_top_eigenvalues(m, args.top_eigenvalue_iterations, seed=seed)
            result["top_eigenvalue"] = {"value": e.value, "iterations": e.iterations[0], "converged": e.converged[0]}
        if args.noise_stability_draws > 0:
            n = estimate_noise_stability(m, args.noise_stability_sigma, args.noise_stability_draws, seed=seed, base_loss=result["loss"])
            result["noise_stability"] = {
                "value": n.value, "stderr": n.stderr, "sigma": n.sigma, "num_draws": n.num_draws,
                "relative": n.value / n.base_loss if n.base_loss else float("nan"),
            }
    return result
