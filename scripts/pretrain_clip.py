"""CLIP contrastive pretraining with the NSO step (or RWP, SAM, ASAM, or plain Trainer), evaluated zero-shot.

With no arguments and no network: a tiny CLIP on scikit-learn's handwritten digits (captions from
templates, a word-level tokenizer trained on them), trained once with `transformers.Trainer` and
once with `NSOTrainer`; prints zero-shot accuracy, recall@1 and time per step, writes
`outputs/clip/clip_results.json`. About 1 min 20 s on a 2-core CPU with one torch thread
(`OMP_NUM_THREADS=1`, which keeps it there when other processes compete for the cores).

Launch:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/pretrain_clip.py
    python scripts/pretrain_clip.py --method nso --sigma 0.01 --num_train_epochs 20
    python scripts/pretrain_clip.py --config clip.yaml --learning_rate 5e-4      # YAML keys = argument names
    python scripts/pretrain_clip.py --method nso --image_folder my_images/ --caption_column text --model_preset small
    accelerate launch scripts/pretrain_clip.py --method nso --dataset_name <hub id> --caption_column caption \
        --gather_features --model_preset small --per_device_train_batch_size 256
"""

from __future__ import annotations

import logging
import os
import sys

from transformers import HfArgumentParser, TrainingArguments

from nso_hf import NSOConfig
from nso_hf.cli import add_config_argument, parse_with_config
from nso_hf.clip.arguments import (
    CLIPDataArguments,
    CLIPModelArguments,
    CLIPRunArguments,
)
from nso_hf.clip.build import build_task
from nso_hf.clip.gather import require_shared_noise
from nso_hf.clip.pipeline import format_table, run_methods

logger = logging.getLogger("pretrain_clip")

# This script's defaults where they differ from the dataclasses': a YAML file in the format of --config.
DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "clip_digits.yaml")

DATACLASSES = (CLIPModelArguments, CLIPDataArguments, CLIPRunArguments, TrainingArguments, NSOConfig)


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(DATACLASSES)
    add_config_argument(parser)
    return parser


def parse(argv: list[str]) -> tuple[tuple, set[str]]:
    """Parse `[--config file.yaml] [--name value ...]`: script defaults < YAML < command line.

    Returns:
        (the five dataclasses, the argument names the user gave in the YAML or on the command line).
    """
    (model_args, data_args, run_args, training_args, nso_config), explicit = parse_with_config(
        make_parser(), argv, base_config=DEFAULTS
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
    )
    if training_args.process_index == 0:
        print(format_table(results))
        print(f"results: {training_args.output_dir}/clip_results.json")
    return results


if __name__ == "__main__":
    import datasets

    datasets.disable_progress_bars()  # the one-off preprocessing maps would otherwise flood the log
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (model_args, data_args, run_args, training_args, nso_config), explicit = parse(sys.argv[1:])
    main(model_args, data_args, run_args, training_args, nso_config, explicit)
