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
    python scripts/pretrain_clip.py --method nso --validation_fraction 0.2 --validation_source validation \
        --eval_strategy steps --eval_steps 30 --load_best_model_at_end true --metric_for_best_model zero_shot_accuracy \
        --save_strategy best --save_total_limit 1 --label_noise 0.2 --robustness true     # docs/clip.md
"""

from __future__ import annotations

import logging
import os
import sys

from nso_hf.clip import cli
from nso_hf.clip.cli import main, make_parser  # noqa: F401 (the script's API, as before)

# This script's defaults where they differ from the dataclasses': a YAML file in the format of --config.
DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "clip_digits.yaml")


def parse(argv: list[str]) -> tuple[tuple, set[str]]:
    """Parse `[--config file.yaml] [--name value ...]`: script defaults < YAML < command line.

    Returns:
        (the five dataclasses, the argument names the user gave in the YAML or on the command line).
    """
    return cli.parse(argv, base_config=DEFAULTS)


if __name__ == "__main__":
    import datasets

    datasets.disable_progress_bars()  # the one-off preprocessing maps would otherwise flood the log
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (model_args, data_args, run_args, training_args, nso_config), explicit = parse(sys.argv[1:])
    main(model_args, data_args, run_args, training_args, nso_config, explicit)
