"""The best checkpoint by the task's own accuracy on a validation source, through Trainer's own options.

Users fine-tune for several epochs and keep the checkpoint that scores best on validation; the paper
picks its checkpoints the same way. Trainer already has the options (`--eval_strategy steps|epoch`,
`--eval_steps`, `--load_best_model_at_end`, `--metric_for_best_model`, `--save_total_limit`); what it
lacks is the task's accuracy: its `evaluate()` computes a loss over `eval_dataset`, while a
chain-of-thought model is judged by the answers it generates and a CLIP model by zero-shot accuracy.

`with_accuracy_evaluation(cls)` gives any Trainer class (`Trainer`, `NSOTrainer`, an `NSOMixin` subclass)
an `evaluate()` that calls the task's scoring function on the validation source given at construction
and logs each number as `eval_<name>`. Everything else is Trainer's: when to evaluate, which
checkpoints to save and rotate, which one is best (`metric_for_best_model`, `greater_is_better`, ties
keep the earlier one) and loading it at the end. Only the validation source is ever scored during
training; test sources are scored once, at the end, by the script.

Evaluating changes nothing in training: generation and zero-shot scoring draw no random numbers and
restore the model's train/eval mode, and under NSO they run after the optimizer step, at W. Their
time and the time spent saving checkpoints are measured apart from the training time (neither is
training compute).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

Score = Callable[[nn.Module], dict[str, float]]


class AccuracyEvaluationMixin:
    """`evaluate()` = the task's accuracy on the validation source; accepts one keyword more: `score`.

    `score(model)` returns the task's metrics (unprefixed: {"exact_match": 0.41, ...}) of the model as
    it is now, on the validation source. `eval_dataset` must still be given (Trainer refuses an
    evaluation strategy without one): pass the validation source, which is what is scored.
    """

    def __init__(self, *args: Any, score: Score, **kwargs: Any):
        self._score = score
        self.evaluation_seconds = 0.0  # every evaluate() of this process
        self.checkpoint_seconds = 0.0  # every checkpoint save of this process
        self.evaluations = 0
        super().__init__(*args, **kwargs)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if eval_dataset is not None:
            raise ValueError(
                "This trainer scores the task's accuracy on the validation source it was built with; evaluate other "
                "data with the script's own evaluation (nso_hf.cot.evaluation / nso_hf.clip.evaluation)."
            )
        start = time.perf_counter()
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in self._score(self.model).items()}
        seconds = time.perf_counter() - start
        self.evaluation_seconds += seconds
        self.evaluations += 1
        metrics[f"{metric_key_prefix}_runtime"] = round(seconds, 4)
        self.log(metrics)  # Trainer's log: state.log_history keeps it (and a checkpoint saves it)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            super()._save_checkpoint(*args, **kwargs)
        finally:
            self.checkpoint_seconds += time.perf_counter() - start


def with_accuracy_evaluation(trainer_class: type) -> type:
    """`trainer_class` with `AccuracyEvaluationMixin` in front (`Trainer` -> `TrainerWithAccuracyEvaluation`)."""
    return type(f"{trainer_class.__name__}WithAccuracyEvaluation", (AccuracyEvaluationMixin, trainer_class), {})


def eval_strategy(training_args: Any) -> str:
    """`--eval_strategy` as the user spells it ("no", "steps", "epoch"), not the enum's repr."""
    return str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))


def evaluates_during_training(training_args: Any) -> bool:
    """Whether Trainer will call `evaluate()` during training (`--eval_strategy` other than no)."""
    return eval_strategy(training_args) != "no"


def metric_name(name: str) -> str:
    """A metric without Trainer's "eval_" prefix: --metric_for_best_model takes either spelling."""
    return name[len("eval_"):] if name.startswith("eval_") else name


def check_selection_options(training_args: Any, validation_source: str | None, metrics: Sequence[str], example: str) -> None:
    """Refuse, before training, evaluation or checkpoint selection that cannot work as asked.

    Args:
        training_args: the run's `TrainingArguments`.
        validation_source: what is scored during training (None: nothing given).
        metrics: the names the run's evaluation produces (unprefixed).
        example: the options to suggest ("--validation_source validation").

    Raises:
        ValueError: naming the option and the fix, for: evaluation during training or
            --load_best_model_at_end without a validation source; --load_best_model_at_end with
            --eval_strategy no; a --metric_for_best_model the evaluation does not produce.
    """
    evaluating = evaluates_during_training(training_args)
    best = training_args.load_best_model_at_end
    if (evaluating or best) and validation_source is None:
        option = "--load_best_model_at_end" if best else f"--eval_strategy {eval_strategy(training_args)}"
        raise ValueError(
            f"{option} scores a validation source during training, but none was given: pass {example}. Test "
            "sources (--eval_sources) are scored only at the end and never choose a checkpoint."
        )
    if best and not evaluating:
        raise ValueError(
            "--load_best_model_at_end has no evaluations to choose from with --eval_strategy no: pass --eval_strategy "
            "steps --eval_steps N --save_strategy steps --save_steps N (or epoch for both)."
        )
    if evaluating and training_args.metric_for_best_model is not None:
        name = metric_name(training_args.metric_for_best_model)
        if name not in metrics:
            default = " (Trainer's default with --load_best_model_at_end)" if name == "loss" else ""
            raise ValueError(
                f"--metric_for_best_model {training_args.metric_for_best_model}{default} is not a metric this run "
                f"produces: its evaluation logs {list(metrics)} (as eval_<name>); pass --metric_for_best_model {metrics[0]}."
            )


def _checkpoint_step(path: str | None) -> int | None:
    match = re.search(r"checkpoint-(\d+)$", os.path.normpath(path)) if path else None
    return int(match.group(1)) if match else None


def selection_results(trainer: Any, validation_source: str | None, validation_examples: int | None) -> dict[str, Any] | None:
    """What evaluation during training found, for the results file; None when nothing was evaluated.

    Returns:
        {"validation_source", "validation_examples", "metric" (--metric_for_best_model or None),
         "curve": [{"step", "epoch", <metric>: value, ..., "seconds"}] (every evaluation, from Trainer's
         log history, so a resumed run has the whole curve), "best_step", "best_metric",
         "best_checkpoint", "final_weights_step" (the step the final weights come from: the best
         checkpoint's when --load_best_model_at_end loaded it, else the last step), "last_step" (the step
         training ended at), "evaluations" and
         "eval_seconds" (this process's), "checkpoint_seconds" (this process's saves)}.
    """
    if not isinstance(trainer, AccuracyEvaluationMixin):
        return None
    curve = []
    for entry in trainer.state.log_history:
        values = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_") and k != "eval_runtime"}
        if values:
            curve.append({"step": entry.get("step"), "epoch": entry.get("epoch"), **values, "seconds": entry.get("eval_runtime")})
    args, state = trainer.args, trainer.state
    best_checkpoint = state.best_model_checkpoint
    loaded = bool(args.load_best_model_at_end and best_checkpoint)
    return {
        "validation_source": validation_source,
        "validation_examples": validation_examples,
        "metric": None if args.metric_for_best_model is None else metric_name(args.metric_for_best_model),
        "curve": curve,
        "best_step": _checkpoint_step(best_checkpoint),
        "best_metric": state.best_metric,
        "best_checkpoint": best_checkpoint,
        "final_weights_step": _checkpoint_step(best_checkpoint) if loaded else state.global_step,
        "last_step": state.global_step,
        "evaluations": trainer.evaluations,
        "eval_seconds": trainer.evaluation_seconds,
        "checkpoint_seconds": trainer.checkpoint_seconds,
    }


def selection_sections(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{label: selection} of a results file that evaluated during training, for plotting.

    Args:
        results: a `cot_results.json` or CLIP `eval_results.json` (one run: a "selection" key), or a
            `clip_results.json` ({method: run results}).

    Returns:
        The runs' `selection_results`, labelled by method; {} when none evaluated during training.
    """
    if "selection" in results:
        return {str(results.get("method", "run")): results["selection"]} if results["selection"] else {}
    return {m: r["selection"] for m, r in results.items() if isinstance(r, dict) and r.get("selection")}


def plot_selection_curves(sections: dict[str, dict[str, Any]], path: str) -> None:
    """The validation score over optimizer steps, one line per run, the step the final weights came from starred.

    Args:
        sections: {label: selection} (`selection_sections`).
        path: the PNG to write (needs matplotlib: `pip install nso-hf[flatness]`).

    Raises:
        ValueError: nothing to plot.
    """
    if not sections:
        raise ValueError("No run in these results evaluated during training (--eval_strategy steps|epoch): no curve to plot.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, selection in sections.items():
        metric = selection["metric"] or next(k for k in selection["curve"][0] if k not in ("step", "epoch", "seconds"))
        steps = [p["step"] for p in selection["curve"]]
        values = [100 * p[metric] for p in selection["curve"]]
        (line,) = ax.plot(steps, values, marker=".", label=label)
        if selection["final_weights_step"] in steps:
            best = steps.index(selection["final_weights_step"])
            ax.plot([steps[best]], [values[best]], marker="*", markersize=14, color=line.get_color(), linestyle="none")
    ax.set_xlabel("optimizer step (star: the final weights' checkpoint)")
    first = next(iter(sections.values()))
    rows = f" ({first['validation_examples']} rows)" if first.get("validation_examples") else ""
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"scored during training on {first['validation_source']}{rows}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_time(wall_seconds: float, global_step: int, selection: dict[str, Any] | None) -> dict[str, Any]:
    """The training seconds and the step the final weights came from, for either script's results file.

    Evaluating and saving checkpoints during training is not training compute, so `train_seconds` leaves
    them out; `train_wall_seconds` is all of `trainer.train()`.

    Args:
        wall_seconds: `trainer.train()`'s wall time.
        global_step: the step training ended at.
        selection: `selection_results` (None: nothing was evaluated during training).

    Returns:
        {"train_seconds", "train_wall_seconds", "final_weights_step"}.
    """
    if selection is None:
        return {"train_seconds": wall_seconds, "train_wall_seconds": wall_seconds, "final_weights_step": global_step}
    return {
        "train_seconds": wall_seconds - selection["eval_seconds"] - selection["checkpoint_seconds"],
        "train_wall_seconds": wall_seconds,
        "final_weights_step": selection["final_weights_step"],
    }
