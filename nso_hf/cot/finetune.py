"""The chain-of-thought fine-tuning run behind `scripts/finetune_cot.py`.

checks before any model loads (options, output folder, the model's position limit from its
config, every data file read and non-empty, the checkpoint to resume from) -> seed -> load the
model (LoRA by default) -> a recipe's data (optionally with label noise), formatted with the prompt masked
-> train with `Trainer` (method "none") or `NSOTrainer` (nso, rwp, sam, asam, flat_lora, nso_merged:
docs/methods.md), resuming if asked, scoring the validation source during training and ending on the best
checkpoint if asked (`nso_hf.best_checkpoint`) -> greedy-generation accuracy on every evaluation source ->
optionally the flatness of the training loss (Hessian trace, top eigenvalue, noise stability) and the
accuracy after GGUF round trips and under weight noise (`nso_hf.robustness`) -> `cot_results.json` beside
the predictions (main process only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from nso_hf.best_checkpoint import check_selection_options, evaluates_during_training, selection_results, training_time
from nso_hf.cli import no_pinning_on_cpu
from nso_hf.compute import MicroBatchCounter, training_compute
from nso_hf.config import NSOConfig, config_for_method
from nso_hf.cot.arguments import CoTDataArguments, CoTScriptArguments, LoraArguments
from nso_hf.cot.checks import InputError, check_output_dir, model_position_limit, resolve_max_length
from nso_hf.cot.resume import resolve_resume_checkpoint
from nso_hf.flatness.final import flatness_batches, measure_flatness


def build_recipe(data_args: CoTDataArguments):
    """The recipe named by `data_args.recipe`, given the options that recipe takes."""
    from data_recipes import get_recipe

    name = data_args.recipe
    common = {"on_bad_row": data_args.on_bad_row}
    if name == "gsm8k":
        return get_recipe(name, keep_calculator_notes=data_args.keep_calculator_notes, **common)
    if name == "jsonl":
        return get_recipe(
            name, question_field=data_args.question_field, rationale_field=data_args.rationale_field,
            answer_field=data_args.answer_field, answer_kind=data_args.answer_kind or "text", **common,
        )
    if name == "cot_json":
        return get_recipe(name, answer_kind=data_args.answer_kind or "text", **common)
    if name == "synthetic":
        return get_recipe(
            name, min_steps=data_args.synthetic_min_steps, max_steps=data_args.synthetic_max_steps,
            ood_min_steps=data_args.synthetic_ood_min_steps, ood_max_steps=data_args.synthetic_ood_max_steps,
            max_operand=data_args.synthetic_max_operand, num_train=data_args.synthetic_num_train,
            num_test=data_args.synthetic_num_eval, num_ood=data_args.synthetic_num_eval,
            seed=data_args.synthetic_seed, **common,
        )
    return get_recipe(name, **common)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _name_parts(source: str) -> list[str]:
    """Path components of a source, suffix dropped from the last: "data/a/test.jsonl" -> ["data", "a", "test"]."""
    parts = [p for p in str(source).replace("\\", "/").split("/") if p not in ("", ".")]
    if parts:
        for suffix in (".jsonl", ".json", ".parquet"):
            if parts[-1].endswith(suffix):
                parts[-1] = parts[-1][: -len(suffix)]
    return [_safe(p) for p in parts if _safe(p)] or ["eval"]


def source_name(source: str) -> str:
    """A file-name-safe name for an evaluation source: "data/test.jsonl" -> "test", "openai/gsm8k" -> "gsm8k"."""
    return _name_parts(source)[-1]


def eval_source_names(sources: list[str]) -> list[str]:
    """Distinct file-name-safe names for evaluation sources, short where they do not clash.

    Each name is the base name ("test"); sources whose names clash take parent folders until they
    differ ("a_test", "b_test"), then a counter. The names key `metrics_<name>.json`,
    `predictions_<name>.jsonl` and `cot_results.json`, so two sources must never share one.

    Raises:
        ValueError: the same source is given twice.
    """
    seen = set()
    for source in sources:
        key = os.path.normpath(str(source))
        if key in seen:
            raise ValueError(f"--eval_sources names {source!r} twice: give each evaluation source once.")
        seen.add(key)
    parts = [_name_parts(s) for s in sources]
    depth = [1] * len(sources)
    names = ["_".join(p[-d:]) for p, d in zip(parts, depth)]
    while True:
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
            names[i] = "_".join(parts[i][-depth[i]:])
    result = []
    for name in names:
        unique, count = name, 1
        while unique in result:
            count += 1
            unique = f"{name}_{count}"
        result.append(unique)
    return result


def data_sources(data_args: CoTDataArguments) -> tuple[str, list[str]]:
    """(training source, evaluation sources), with the synthetic recipe's split names as defaults."""
    if data_args.recipe == "synthetic":
        return data_args.train_source or "train", list(data_args.eval_sources or ["test", "ood"])
    if data_args.train_source is None:
        raise ValueError(f"--train_source is required for recipe {data_args.recipe!r} (a Hub id or a local file).")
    return data_args.train_source, list(data_args.eval_sources or [])


def position_limit(script_args: CoTScriptArguments) -> tuple[int | None, str]:
    """(max_position_embeddings, model name) of the model to fine-tune, without loading or building it."""
    if script_args.preset == "smollm2":
        from nso_hf.cot.models import smollm2_location

        folder, gguf_file = smollm2_location()
        return model_position_limit(folder, gguf_file), os.path.join(folder, gguf_file)
    if script_args.model_name_or_path is None:
        from nso_hf.cot.tiny_base_model import TinyBaseSpec

        return TinyBaseSpec().max_position_embeddings, "the tiny default base model"
    return model_position_limit(script_args.model_name_or_path, script_args.gguf_file), script_args.model_name_or_path


@dataclasses.dataclass
class CheckedInputs:
    """What `checked_inputs` verified and read: the run's data and settings, before any model exists."""

    recipe: Any
    resume: str | None
    max_length: int
    train_source: str
    train_data: Any
    load_report: Any
    eval_sets: dict[str, Any]
    eval_origin: dict[str, str]
    validation: Any = None  # the rows scored during training (None: no --validation_source)
    label_noise: Any = None  # data_recipes.label_noise.LabelNoiseReport of the training rows


def training_inputs(script_args: CoTScriptArguments, data_args: CoTDataArguments) -> CheckedInputs:
    """--max_length checked against the model's positions and the training data read (no evaluation sets).

    Raises:
        ValueError, OSError: a bad option, a missing or unreadable file, or no training example.
    """
    max_length = resolve_max_length(data_args.max_length, *position_limit(script_args))
    recipe = build_recipe(data_args)
    train_source, _ = data_sources(data_args)
    train_data = recipe.load(train_source, split=data_args.train_split, max_samples=data_args.max_train_samples)
    if len(train_data) == 0:  # local files already raise in Recipe.load; this covers generated splits
        raise ValueError(f"{train_source}: no examples to use.")
    load_report = recipe.last_report
    from data_recipes.label_noise import add_label_noise

    train_data, noise = add_label_noise(train_data, data_args.label_noise, data_args.label_noise_seed, recipe.answer_kind)
    return CheckedInputs(recipe, None, max_length, train_source, train_data, load_report, {}, {}, label_noise=noise)


# What the evaluation during training logs (as eval_<name>): the names --metric_for_best_model may take.
SELECTION_METRICS = ("exact_match", "exact_match_strict", "exact_match_flexible")


def validation_inputs(data_args: CoTDataArguments, recipe: Any, eval_sources: list[str]) -> Any:
    """The rows scored during training: the first --validation_samples of --validation_source, or None.

    Raises:
        ValueError: the validation source is also an evaluation source (the test data would choose the
            checkpoint), or it has no rows.
    """
    source = data_args.validation_source
    if source is None:
        return None
    from data_recipes.sources import is_local_source

    # A synthetic split or a file is the same data under the same name; a Hub id only with the same split.
    named_alike = data_args.recipe == "synthetic" or is_local_source(str(source))
    for test in eval_sources:
        same = os.path.normpath(str(test)) == os.path.normpath(str(source))
        if same and (named_alike or data_args.validation_split == data_args.eval_split):
            raise ValueError(
                f"--validation_source {source} is also one of --eval_sources: a test source must never choose the "
                "checkpoint. Hold out a separate validation source (synthetic: validation)."
            )
    data = recipe.load(source, split=data_args.validation_split, max_samples=data_args.validation_samples)
    if len(data) == 0:
        raise ValueError(f"--validation_source {source}: no examples to use.")
    return data


def checked_inputs(
    script_args: CoTScriptArguments, data_args: CoTDataArguments, training_args: Any
) -> CheckedInputs:
    """Check the output folder, the checkpoint to resume from and --max_length, and read every data source.

    Runs on every rank before any model is loaded or built: a bad option or file costs seconds.

    Raises:
        InputError: one line naming the option or file and the fix (the scripts print it alone).
    """
    try:
        check_output_dir(training_args.output_dir)
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
        inputs = training_inputs(script_args, data_args)
        _, eval_sources = data_sources(data_args)
        names = eval_source_names(eval_sources)
        eval_sets = {
            name: inputs.recipe.load(source, split=data_args.eval_split, max_samples=data_args.max_eval_samples)
            for name, source in zip(names, eval_sources)
        }
        eval_origin = dict(zip(names, eval_sources))
        for name, data in eval_sets.items():
            if len(data) == 0:
                raise ValueError(f"{eval_origin[name]}: no examples to use.")
        check_selection_options(
            training_args, data_args.validation_source, SELECTION_METRICS, "--validation_source validation (synthetic) or a file"
        )
        validation = validation_inputs(data_args, inputs.recipe, eval_sources)
        if script_args.robustness:
            from nso_hf.robustness import require_gguf

            require_gguf()
    except (ValueError, OSError) as error:  # OSError: a missing file or model folder
        raise InputError(str(error)) from None  # the message says it all; the traceback would bury it
    return dataclasses.replace(inputs, resume=resume, eval_sets=eval_sets, eval_origin=eval_origin, validation=validation)


def load_model(script_args: CoTScriptArguments, training_args: Any, lora_args: LoraArguments) -> tuple:
    """(model with LoRA adapters unless `full_finetune`, tokenizer, path, gguf file), seeded by `training_args`.

    The tiny default base model is built once, by the main process, then loaded by every process.
    """
    from transformers.trainer_utils import enable_full_determinism, set_seed

    from nso_hf.cot.models import add_lora, load_causal_lm, resolve_model_source

    with training_args.main_process_first(desc="base model"):
        path, gguf_file = resolve_model_source(
            script_args.model_name_or_path, script_args.gguf_file, script_args.preset,
            script_args.base_model_cache_dir, script_args.tiny_pretrain_steps,
        )
    # Seeded as Trainer seeds itself, but before the LoRA adapters are drawn: Trainer's own seeding
    # comes after the model exists, so the adapters (and the whole run) would follow whatever the
    # global RNG held, e.g. differ between a first demo run that pretrained the base model and a
    # cached one.
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)
    model, tokenizer = load_causal_lm(path, gguf_file)
    if not script_args.full_finetune:
        model = add_lora(model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target_modules)
    return model, tokenizer, path, gguf_file


def training_features(inputs: CheckedInputs, data_args: CoTDataArguments, tokenizer: Any) -> tuple:
    """(tokenized training features with the prompt masked, format report) of the checked training data.

    Raises:
        InputError: --max_length removed every example.
    """
    from data_recipes.formatting import format_for_training

    features, format_report = format_for_training(
        inputs.train_data, tokenizer, data_args.template, inputs.max_length, data_args.overlong
    )
    report = inputs.load_report
    print(f"[cot] {inputs.train_source}: {report.kept} rows loaded, {report.dropped} bad rows dropped; "
          f"{format_report.summary()}", flush=True)
    if len(features) == 0:  # the data had rows (checked above): the length limit removed them all
        raise InputError(
            f"{inputs.train_source}: all {format_report.dropped} examples are longer than --max_length "
            f"{inputs.max_length} tokens: raise --max_length or pass --overlong truncate."
        )
    return features, format_report


def make_trainer(nso_config: NSOConfig | None, score: Any = None, **trainer_kwargs: Any):
    """A plain `Trainer` when `nso_config` is None, else an `NSOTrainer` running it.

    With `score` (model -> the task's metrics on the validation source), the class evaluates with it
    during training (`nso_hf.best_checkpoint.with_accuracy_evaluation`).
    """
    from transformers import Trainer

    from nso_hf.best_checkpoint import with_accuracy_evaluation
    from nso_hf.trainer import NSOTrainer

    cls, kwargs = (Trainer, {}) if nso_config is None else (NSOTrainer, {"nso_config": nso_config})
    if score is not None:
        cls, kwargs = with_accuracy_evaluation(cls), {**kwargs, "score": score}
    return cls(**kwargs, **trainer_kwargs)


def run_cot_finetune(
    script_args: CoTScriptArguments,
    data_args: CoTDataArguments,
    training_args: Any,
    nso_config: NSOConfig,
    lora_args: LoraArguments,
) -> dict[str, Any]:
    """Fine-tune, evaluate and report; returns the results dict written to `cot_results.json`.

    Args:
        script_args: model, method and evaluation settings.
        data_args: recipe, sources and formatting.
        training_args: `transformers.TrainingArguments`.
        nso_config: the step: its `method` (none: plain Trainer) and strength.
        lora_args: adapter settings (ignored with `full_finetune`).

    Returns:
        {"method", "model", "trainable_parameters", "data" (with "label_noise"), "train", "selection" (the
         validation curve and the step the final weights come from, or None), "eval": {name: metrics},
         "hessian_trace": {...} or None, "flatness": {loss, hessian_trace, top_eigenvalue, noise_stability} or None,
         "robustness": accuracy after GGUF round trips and under weight noise (`nso_hf.robustness`) or None}.
    """
    import torch
    from transformers import DataCollatorForSeq2Seq

    from nso_hf.cot.evaluation import evaluate_cot

    # Everything that can be wrong with the options and the data fails here, on every rank, before
    # minutes of model loading (or of pretraining the tiny default) and long before the first save.
    inputs = checked_inputs(script_args, data_args, training_args)
    recipe, resume, max_length = inputs.recipe, inputs.resume, inputs.max_length
    train_source, load_report = inputs.train_source, inputs.load_report
    eval_sets, eval_origin = inputs.eval_sets, inputs.eval_origin
    no_pinning_on_cpu(training_args)

    model, tokenizer, path, gguf_file = load_model(script_args, training_args, lora_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if script_args.robustness:
        from nso_hf.robustness import check_quantizable

        try:
            check_quantizable(model)
        except ValueError as error:  # found once the model exists, still before training
            raise InputError(str(error)) from None
    features, format_report = training_features(inputs, data_args, tokenizer)
    if inputs.label_noise.rows_changed:
        noise = inputs.label_noise
        print(f"[cot] label noise p={noise.p}: {noise.rows_changed} of {noise.rows} training rows given a wrong answer "
              f"({noise.rationales_changed} rationales rewritten to match)", flush=True)

    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    method = nso_config.method
    nso_config = config_for_method(method, nso_config)
    score, extra = None, {}
    if evaluates_during_training(training_args):  # the checks made sure a validation source exists

        def score(model: Any) -> dict[str, float]:
            metrics = evaluate_cot(
                model, tokenizer, inputs.validation, recipe, format_report.template, "validation", None,
                script_args.max_new_tokens, script_args.generation_batch_size, progress=False,
            )
            return {k: metrics[k] for k in (*SELECTION_METRICS, "num_truncated")}

        extra = {"eval_dataset": inputs.validation}
    micro_batches = MicroBatchCounter()
    trainer = make_trainer(
        nso_config, score, model=model, args=training_args, train_dataset=features,
        data_collator=collator, processing_class=tokenizer, callbacks=[micro_batches], **extra,
    )
    if resume is not None:
        print(f"[cot] resuming from {resume}", flush=True)
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume)
    wall_seconds = time.perf_counter() - start
    selection = selection_results(
        trainer, None if inputs.validation is None else data_args.validation_source,
        None if inputs.validation is None else len(inputs.validation),
    )
    timing = training_time(wall_seconds, train_output.global_step, selection)  # evaluations and saves left out
    resumed_at = 0
    if resume is not None:
        with open(os.path.join(resume, "trainer_state.json"), encoding="utf-8") as handle:
            resumed_at = json.load(handle).get("global_step", 0)
    steps = max(1, train_output.global_step - resumed_at)  # the steps this process ran
    train_metrics = {
        "global_step": train_output.global_step,
        "train_loss": train_output.training_loss,
        "train_seconds": timing["train_seconds"],
        "seconds_per_step": timing["train_seconds"] / steps,
        # trainer.train()'s wall time: training plus evaluations and checkpoint saves during training.
        "train_wall_seconds": timing["train_wall_seconds"],
        "eval_seconds": None if selection is None else selection["eval_seconds"],
        "checkpoint_seconds": None if selection is None else selection["checkpoint_seconds"],
        "final_weights_step": timing["final_weights_step"],
        "resumed_from": resume,
        "resumed_at_step": resumed_at,
        # The compute spent: forward+backward passes this process ran (a plain step of the schedule makes one).
        **training_compute(trainer, micro_batches),
        # This process's peak CUDA allocation in training (None on CPU, where only the process's own
        # resident-set peak exists: scripts/compare_methods.py records that per run).
        "peak_cuda_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    if script_args.save_final_model:
        trainer.save_model(training_args.output_dir)

    model = trainer.model
    evaluations = {
        name: evaluate_cot(
            model, tokenizer, data, recipe, format_report.template, name, training_args.output_dir,
            script_args.max_new_tokens, script_args.generation_batch_size, progress=not training_args.disable_tqdm,
        )
        for name, data in eval_sets.items()
    }
    flatness = None
    if script_args.wants_flatness:
        batches = flatness_batches(
            features, collator, training_args.per_device_train_batch_size, script_args.hessian_trace_batches
        )
        flatness = measure_flatness(model, batches, script_args, training_args.seed)
    robustness = None
    if script_args.robustness:
        from nso_hf.robustness import measure_robustness

        def evaluate_moved(label: str) -> dict[str, float]:
            return {
                name: evaluate_cot(
                    model, tokenizer, data, recipe, format_report.template, f"{name} {label}", None,
                    script_args.max_new_tokens, script_args.generation_batch_size, progress=not training_args.disable_tqdm,
                )["exact_match"]
                for name, data in eval_sets.items()
            }

        clean = {name: metrics["exact_match"] for name, metrics in evaluations.items()}
        robustness = measure_robustness(
            model, evaluate_moved, clean, script_args.robustness_noise, script_args.robustness_noise_draws,
            training_args.seed,
        )
    results = {
        "method": method,
        "model": path if gguf_file is None else os.path.join(path, gguf_file),
        "full_finetune": script_args.full_finetune,
        "trainable_parameters": trainable,
        "nso_config": None if nso_config is None else nso_config.to_dict(),
        "data": {"recipe": data_args.recipe, "train_source": train_source, "rows_kept": load_report.kept,
                 "rows_dropped": load_report.dropped, "max_length": max_length,
                 "eval_sources": eval_origin, **dataclasses.asdict(format_report),
                 "label_noise": inputs.label_noise.to_dict()},
        "train": train_metrics,
        "selection": selection,
        "eval": evaluations,
        "hessian_trace": None if flatness is None else flatness["hessian_trace"],
        "flatness": flatness,
        "robustness": robustness,
    }
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "cot_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    for name, metrics in evaluations.items():
        print(f"[cot] {method} {name}: exact match {metrics['exact_match']:.3f} "
              f"({metrics['num_correct']}/{metrics['num_examples']}; flexible {metrics['exact_match_flexible']:.3f}, "
              f"{metrics['num_truncated']} cut off at --max_new_tokens)", flush=True)
    return results
