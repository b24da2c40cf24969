"""`FlatnessCallback`: Hessian trace and top eigenvalue logged during training.

The measures run on a fixed set of batches given once, so runs with `Trainer` and `NSOTrainer` are
compared on the same data. They are logged through `trainer.log`, the Trainer's own logging: the
values land in `trainer.state.log_history` with the step and epoch, and every reporting integration
(TensorBoard, W&B, ...) and callback sees them in `on_log`. A `TrainerCallback` is not handed the
trainer, so it holds a reference to it, as trl's `WinRateCallback` / `LogCompletionsCallback` do:
pass `trainer=` to the constructor, or call `bind(trainer)` once the trainer exists.

Logged keys: `flatness/hessian_trace`, `flatness/hessian_trace_stderr`, `flatness/top_eigenvalue`,
`flatness/top_eigenvalue_residual` (an error bound: some eigenvalue of H lies within it; power
iteration has no standard error). Both run in one `Measurement`. Cost per measurement:
`num_probes + max_iter` Hessian-vector products, each two forward+backward passes per batch with the
default finite-difference product (see docs/flatness.md).

Under data-parallel training the callback runs on every process (the products are all-reduced,
so every process must take part); each process measures the batches it was given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from nso_hf.flatness.context import LossFn, Measurement
from nso_hf.flatness.eigen import estimate_top_eigenvalues
from nso_hf.flatness.hvp import HVP_METHODS
from nso_hf.flatness.trace import estimate_trace


class FlatnessCallback(TrainerCallback):
    """Log the Hessian trace and top eigenvalue at evaluation and/or every N optimizer steps.

    Args:
        batches: the fixed batches to measure on (dicts for `model(**batch).loss`, or any batch
            with `loss_fn`); held for the whole run, moved to the model's device when measured.
        trainer: the Trainer to log through; or call `bind(trainer)` before training.
        every_n_steps: also measure when `global_step % every_n_steps == 0` (None: only at evaluation).
        on_evaluate: measure after each evaluation.
        num_probes: Hutchinson probes for the trace.
        trace_tolerance: optional early stop of the trace (stderr <= tolerance * |trace|).
        max_iter: power iterations for the top eigenvalue; 0 skips the eigenvalue.
        eigen_tolerance: relative change at which power iteration stops.
        loss_fn, parameters, include, exclude, seed, hvp: as in `nso_hf.flatness.hessian_trace`.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        trainer: Any | None = None,
        *,
        every_n_steps: int | None = None,
        on_evaluate: bool = True,
        num_probes: int = 20,
        trace_tolerance: float | None = None,
        max_iter: int = 20,
        eigen_tolerance: float = 1e-3,
        loss_fn: LossFn | None = None,
        parameters: str = "trainable",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        seed: int = 0,
        hvp: str = "auto",
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}.")
        if every_n_steps is None and not on_evaluate:
            raise ValueError("FlatnessCallback would never measure: set every_n_steps or on_evaluate=True.")
        if max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {max_iter}.")
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp={hvp!r} is not one of {HVP_METHODS}.")
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("FlatnessCallback needs at least one batch.")
        self.trainer = trainer
        self.every_n_steps, self.on_evaluate_flag = every_n_steps, on_evaluate
        self.num_probes, self.trace_tolerance = num_probes, trace_tolerance
        self.max_iter, self.eigen_tolerance = max_iter, eigen_tolerance
        self.scope = {"loss_fn": loss_fn, "parameters": parameters, "include": include, "exclude": exclude}
        self.seed, self.hvp = seed, hvp
        self._last_step: int | None = None

    def bind(self, trainer: Any) -> FlatnessCallback:
        """Set the Trainer whose `log` receives the measures; returns self."""
        self.trainer = trainer
        return self

    def _require_trainer(self) -> None:
        if self.trainer is None:
            raise ValueError(
                "FlatnessCallback has no trainer to log through: pass FlatnessCallback(batches, trainer=trainer) "
                "or call callback.bind(trainer) before trainer.train()."
            )

    def measure(self, model: Any) -> dict[str, float]:
        """The logged metrics for `model` at its current weights."""
        with Measurement(model, self.batches, **self.scope) as m:
            trace = estimate_trace(
                m, self.num_probes, tolerance=self.trace_tolerance, min_probes=min(10, self.num_probes),
                seed=self.seed, hvp=self.hvp,
            )
            metrics = {"flatness/hessian_trace": trace.value, "flatness/hessian_trace_stderr": trace.stderr}
            if self.max_iter > 0:
                eig = estimate_top_eigenvalues(
                    m, self.max_iter, tolerance=self.eigen_tolerance, seed=self.seed, hvp=self.hvp
                )
                metrics["flatness/top_eigenvalue"] = eig.value
                metrics["flatness/top_eigenvalue_residual"] = eig.residual
        return metrics

    def _log(self, state: TrainerState, model: Any) -> None:
        if self._last_step == state.global_step:  # evaluation and every_n_steps on the same step
            return
        self._require_trainer()
        self._last_step = state.global_step
        self.trainer.log(self.measure(model))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._require_trainer()  # fail before hours of training, not at the first measurement

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self._log(state, kwargs["model"])

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.on_evaluate_flag:
            self._log(state, kwargs["model"])
