"""The command line of `scripts/pretrain_clip.py`: its parser, its parse and its main, importable.

`scripts/compare_methods.py --task clip` runs the same `parse` and `main` in its worker processes, so
a comparison measures exactly what a user's `pretrain_clip.py` run does.
"""

from __future__ import annotations

from transformers import HfArgumentParser, TrainingArguments

from nso_hf.cli import add_config_argument, parse_with_config
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
    )
    if training_args.process_index == 0:
        print(format_table(results))
        print(f"results: {training_args.output_dir}/clip_results.json")
    return results
