"""Train one CLIP per method on the same data and evaluate each: the library side of `pretrain_clip.py`.

`run_method` builds the Trainer class the method names (`trainers.trainer_class`), trains with the
logit-scale clamp and a step timer (scoring the validation split during training and ending on the best
checkpoint when asked: `nso_hf.best_checkpoint`), optionally measures the flatness of the training loss at
the final weights (`nso_hf.flatness.final`), evaluates every evaluation split on the main process
(optionally also after GGUF round trips and under weight noise: `nso_hf.robustness`) and writes
`eval_results.json`. `run_methods` repeats it per method from the same initial weights and data
order (each model is built from `training_args.seed`), and `format_table` prints the comparison.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import CLIPModel, TrainingArguments

from nso_hf.best_checkpoint import evaluates_during_training, selection_results, training_time, with_accuracy_evaluation
from nso_hf.clip.collator import CLIPCollator
from nso_hf.clip.evaluation import evaluate_clip, write_json
from nso_hf.clip.logit_scale import DEFAULT_MAX_LOGIT_SCALE, LogitScaleClampCallback
from nso_hf.clip.trainers import nso_kwargs, trainer_class
from nso_hf.compute import MicroBatchCounter, training_compute
from nso_hf.config import NSOConfig
from nso_hf.flatness.final import FlatnessArguments, flatness_batches, measure_flatness
from nso_hf.robustness import RobustnessArguments
from nso_hf.timing import StepTimer

logger = logging.getLogger(__name__)


@dataclass
class CLIPTask:
    """Everything a run needs besides the model and the training arguments.

    Attributes:
        train: dataset of image-caption rows.
        evals: {split name: dataset} evaluated after training, in order (the first is the main one).
        collator: the training collator (with augmentation); evaluation uses a copy without it.
        class_names: zero-shot classes (None: no zero-shot accuracy).
        templates: zero-shot prompts with one "{}".
        label_column: integer class per row, indexing `class_names`.
        validation: the rows scored during training (`--validation_source`; None: none).
        validation_source: the name of that split.
        label_noise: what `--label_noise` changed in `train` (a `LabelNoiseReport`; None: not applied).
    """

    train: Any
    evals: dict[str, Any]
    collator: CLIPCollator
    class_names: Sequence[str] | None = None
    templates: Sequence[str] = ("a photo of a {}",)
    label_column: str | None = "label"
    extra_processors: list[Any] = field(default_factory=list)  # saved beside the model (image processor)
    validation: Any = None
    validation_source: str | None = None
    label_noise: Any = None


def run_method(
    method: str,
    make_model: Callable[[], CLIPModel],
    task: CLIPTask,
    training_args: TrainingArguments,
    nso_config: NSOConfig | None,
    gather_features: bool = False,
    save_model: bool = False,
    max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE,
    flatness: FlatnessArguments | None = None,
    robustness: RobustnessArguments | None = None,
) -> dict[str, Any]:
    """Train and evaluate one model.

    Args:
        method: one of `nso_hf.config.METHODS`.
        make_model: returns a fresh model (called once, after seeding with `training_args.seed`).
        task: data, collator and evaluation settings.
        training_args: used as given (its `output_dir` receives the JSON).
        nso_config: the step's settings (its `method` is replaced by `method`).
        gather_features: contrastive loss over all ranks' features.
        save_model: save the final model, tokenizer and image processor to `output_dir`.
        max_logit_scale: bound of the log temperature, clamped after every optimizer step.
        flatness: the flatness measures to take at the end, on the first training batches without
            augmentation (every process takes part; None or none asked: skipped).
        robustness: with `robustness.robustness`, zero-shot accuracy of every split after GGUF round trips
            and under weight noise (main process).

    Returns:
        The first evaluation split's metrics, `eval` ({split: metrics} of every split), `flatness`
        (or None), `train_loss`, `steps`, `micro_batches` and `forward_backward_passes` (this process's
        training compute, nso_hf.compute), `seconds_per_step` (median of the timed steps),
        `train_seconds` (Trainer's `train_runtime` less the evaluations and checkpoint saves during
        training), `train_wall_seconds` (all of it), `selection` (the validation curve and the step the
        final weights come from, or None), `final_weights_step`, `label_noise`, `robustness` (or None),
        `peak_cuda_memory_mib` (training's peak CUDA allocation on this process; None on CPU), the final
        `logit_scale` and `method`; on ranks other than the main one, the training and flatness numbers only.
    """
    import torch

    torch.manual_seed(training_args.seed)
    model = make_model()
    on_cuda = torch.cuda.is_available() and not training_args.use_cpu
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    wants_robustness = robustness is not None and robustness.robustness
    if wants_robustness:
        from nso_hf.robustness import check_quantizable

        check_quantizable(model)  # before training: a model with nothing to quantize fails now
    cls = trainer_class(method, gather_features)
    eval_collator = replace(task.collator, augment=None, random_caption=False)
    extra: dict[str, Any] = {}
    if evaluates_during_training(training_args):  # cli.main checked that a validation split exists

        def score(model: CLIPModel) -> dict[str, float]:
            return evaluate_clip(
                model, task.validation, eval_collator, task.class_names, task.templates, task.label_column,
                batch_size=training_args.per_device_eval_batch_size * 4,
            )

        cls = with_accuracy_evaluation(cls)
        extra = {"score": score, "eval_dataset": task.validation}
    timer, micro_batches = StepTimer(), MicroBatchCounter()
    trainer = cls(
        model=model,
        args=training_args,
        train_dataset=task.train,
        data_collator=task.collator,
        processing_class=task.collator.tokenizer,
        callbacks=[LogitScaleClampCallback(max_logit_scale), timer, micro_batches],
        **nso_kwargs(method, nso_config if nso_config is not None else NSOConfig()),
        **extra,
    )
    result = trainer.train()
    selection = selection_results(trainer, task.validation_source, None if task.validation is None else len(task.validation))
    out: dict[str, Any] = {
        "method": method,
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "seconds_per_step": timer.median_seconds(),
        # train_runtime: wall time, data loading included; evaluations and saves are left out of train_seconds.
        **training_time(float(result.metrics["train_runtime"]), int(result.global_step), selection),
        "selection": selection,
        "label_noise": None if task.label_noise is None else task.label_noise.to_dict(),
        **training_compute(trainer, micro_batches),  # forward+backward passes this process ran
        "logit_scale": float(trainer.model.logit_scale.detach().float().item()),
        "peak_cuda_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        "flatness": None,
        "robustness": None,
    }
    if flatness is not None and flatness.wants_flatness:
        batches = flatness_batches(task.train, eval_collator, training_args.per_device_train_batch_size, flatness.hessian_trace_batches)
        out["flatness"] = measure_flatness(trainer.model, batches, flatness, training_args.seed)
    if trainer.is_world_process_zero():
        evaluations = {
            name: evaluate_clip(
                trainer.model, split, eval_collator, task.class_names, task.templates, task.label_column,
                batch_size=training_args.per_device_eval_batch_size * 4,
            )
            for name, split in task.evals.items()
        }
        out.update(next(iter(evaluations.values())))
        out["eval"] = evaluations
        if wants_robustness:
            from nso_hf.robustness import measure_robustness

            def evaluate_moved(label: str) -> dict[str, float]:
                return {
                    name: evaluate_clip(
                        trainer.model, split, eval_collator, task.class_names, task.templates, task.label_column,
                        batch_size=training_args.per_device_eval_batch_size * 4,
                    )["zero_shot_accuracy"]
                    for name, split in task.evals.items()
                }

            clean = {name: e["zero_shot_accuracy"] for name, e in evaluations.items()}
            out["robustness"] = measure_robustness(
                trainer.model, evaluate_moved, clean, robustness.robustness_noise, robustness.robustness_noise_draws,
                training_args.seed, log=logger.info,
            )
        if not all(math.isfinite(v) for e in evaluations.values() for v in e.values()):
            logger.warning("Non-finite numbers in the results of method %s: %s", method, out)
        write_json(out, os.path.join(training_args.output_dir, "eval_results.json"))
    if save_model:
        trainer.save_model()
        if trainer.is_world_process_zero():
            for processor in task.extra_processors:
                processor.save_pretrained(training_args.output_dir)
    return out


def run_methods(
    methods: Sequence[str],
    make_model: Callable[[], CLIPModel],
    task: CLIPTask,
    training_args: TrainingArguments,
    nso_config: NSOConfig | None,
    gather_features: bool = False,
    save_model: bool = False,
    max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE,
    flatness: FlatnessArguments | None = None,
    robustness: RobustnessArguments | None = None,
) -> dict[str, dict[str, Any]]:
    """`run_method` for each method, each in `output_dir/<method>` when there are several; results JSON in `output_dir`."""
    results = {}
    for method in methods:
        args = training_args
        if len(methods) > 1:
            args = copy.deepcopy(training_args)
            args.output_dir = os.path.join(training_args.output_dir, method)
        results[method] = run_method(
            method, make_model, task, args, nso_config, gather_features, save_model, max_logit_scale, flatness, robustness
        )
    if training_args.process_index == 0:
        write_json(results, os.path.join(training_args.output_dir, "clip_results.json"))
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Args: results: {method: metrics} from `run_methods`. Returns: a Markdown table, one row per method."""
    columns = [
        ("zero-shot acc", "zero_shot_accuracy", "{:.3f}"),
        ("i2t R@1", "i2t_recall@1", "{:.3f}"),
        ("t2i R@1", "t2i_recall@1", "{:.3f}"),
        ("i2t R@5", "i2t_recall@5", "{:.3f}"),
        ("train loss", "train_loss", "{:.3f}"),
        ("ms / step (median)", "seconds_per_step", "{:.0f}"),
        ("train s", "train_seconds", "{:.0f}"),
    ]
    names = {"none": "Trainer", "nso": "NSOTrainer (NSO)", "rwp": "NSOTrainer (RWP)"}
    header = "| method | " + " | ".join(c[0] for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for method, m in results.items():
        cells = []
        for _, key, fmt in columns:
            value = m.get(key)
            if value is None:
                cells.append("-")
            else:
                cells.append(fmt.format(value * 1000 if key == "seconds_per_step" else value))
        lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
