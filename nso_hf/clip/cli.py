"""The command line of `scripts/pretrain_clip.py`: its parser, its parse and its main, importable.

`scripts/compare_methods.py --task clip` runs the same `parse` and `main` in its worker processes, so
a comparison measures exactly what a user's `pretrain_clip.py` run does.
"""

from __future__ import annotations

from transformers import HfArgumentParser, TrainingArguments

from nso_hf.cli import add_config_argument, no_pinning_on_cpu, parse_with_config
from nso_hf.clip.arguments import CLIPDataArguments, CLIPModelArguments, CLIPRunArguments
from nso_hf.config import NSOConfig

DATACLASSES = (CLIPModelArguments, CLIPDataArguments, CLIPRunArguments, TrainingArguments, NSOConfig)


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(DATACLASSES)
    add_config_argument(parser)
    return parser


def parse(argv: list[str], base_config: str | None = None) -> tuple[tuple, set[str]]:
    """Parse `[--config file.yaml] [--name value ...]`: defaults < `base_config` < YAML < command line.

    Returns:
        (the five dataclasses, the argument names the user gave in the YAML or on the command line).
    """
    (model_args, data_args, run_args, training_args, nso_config), explicit = parse_with_config(
        make_parser(), argv, base_config=base_config
    )
    if "method" in explicit:  # one method; without --method, every compare_methods entry
        run_args.method = nso_config.method
    return (model_args, data_args, run_args, training_args, nso_config), explicit


def produced_metrics(data_args: CLIPDataArguments) -> tuple[str, ...]:
    """What `evaluate_clip` reports for this data (the names --metric_for_best_model may take).

    Zero-shot accuracy needs classes: the embedded digits have them, other data with a --label_column.
    """
    has_classes = (data_args.dataset_name is None and data_args.image_folder is None) or data_args.label_column is not None
    retrieval = tuple(f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5))
    return (("zero_shot_accuracy",) if has_classes else ()) + retrieval


def check_run_options(data_args: CLIPDataArguments, run_args: CLIPRunArguments, training_args: TrainingArguments) -> None:
    """Evaluation during training, checkpoint selection and --robustness as asked, checked before any data loads.

    Raises:
        ValueError: naming the option and the fix (`nso_hf.best_checkpoint.check_selection_options`), or
            --robustness without the gguf package or without zero-shot classes.
    """
    from nso_hf.best_checkpoint import check_selection_options

    metrics = produced_metrics(data_args)
    check_selection_options(
        training_args, data_args.validation_source, metrics, "--validation_source validation --validation_fraction 0.2"
    )
    if run_args.robustness:
        from nso_hf.robustness import require_gguf

        require_gguf()
        if "zero_shot_accuracy" not in metrics:
            raise ValueError("--robustness reports zero-shot accuracy, which needs classes: pass --label_column, or drop --robustness.")


def main(
    model_args: CLIPModelArguments,
    data_args: CLIPDataArguments,
    run_args: CLIPRunArguments,
    training_args: TrainingArguments,
    nso_config: NSOConfig,
    explicit: set[str],
) -> dict:
    """Train and evaluate every method of `run_args`; returns {method: results} (`pipeline.run_methods`)."""
    from nso_hf.clip.build import build_task
    from nso_hf.clip.gather import require_shared_noise
    from nso_hf.clip.pipeline import format_table, run_methods

    if training_args.remove_unused_columns:
        raise ValueError("remove_unused_columns must be False: the collator reads the image and caption columns.")
    if "two_point" in explicit and "method" in explicit:
        raise ValueError(f"--method {nso_config.method} decides one- or two-point noise; drop --two_point.")
    if run_args.gather_features and any(m != "none" for m in run_args.methods):
        require_shared_noise(nso_config, explicitly_set="sync_noise_across_ranks" in explicit)
    check_run_options(data_args, run_args, training_args)
    no_pinning_on_cpu(training_args)
    task, make_model = build_task(model_args, data_args)
    results = run_methods(
        run_args.methods,
        make_model,
        task,
        training_args,
        nso_config,
        gather_features=run_args.gather_features,
        save_model=run_args.save_final_model,
        max_logit_scale=run_args.max_logit_scale,
        flatness=run_args,
        robustness=run_args,
    )
    if training_args.process_index == 0:
        print(format_table(results))
        print(f"results: {training_args.output_dir}/clip_results.json")
    return results
