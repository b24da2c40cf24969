"""Compare methods on one task over seeds, at equal steps and at equal compute: chain-of-thought
fine-tuning (finetune_cot.py, the default) or CLIP pretraining (pretrain_clip.py, --task clip).

Each method's strength is chosen on a validation split, then every method runs for every seed; the
results (mean ± std, seed-paired differences with 95% t-intervals, the pre-registered decision) go
to results.json, results.md and results.png in --output_dir. docs/results.md has the measured table.

    python scripts/compare_methods.py                         # the embedded default (`make experiment`)
    python scripts/compare_methods.py --quick --output_dir /tmp/quick     # the pipeline in < 1 minute
    python scripts/compare_methods.py --task clip                 # tiny CLIP on the digits (`make experiment-clip`)
    python scripts/compare_methods.py --methods none nso sam --seeds 0 1 2 3 4 --steps 300 \
        --grid nso=0.005,0.01,0.02 --output_dir outputs/cmp
    # any other option goes to every run of the task's script. A real model in bf16 on GPUs, each run
    # launched by accelerate (docs/results.md, "On a GPU"):
    python scripts/compare_methods.py --launcher "accelerate launch --num_processes 8" \
        --run_config my_gsm8k.yaml --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --bf16 true \
        --use_cpu false --validation_sources data/val.jsonl --selection val --test_sources data/test.jsonl --primary test

Options: `python scripts/compare_methods.py --help` (the run options: finetune_cot.py's or pretrain_clip.py's --help).
"""

from __future__ import annotations

import os
import sys

from transformers import HfArgumentParser

from nso_hf.experiment.compare import ExperimentArguments, compare_methods, main_command
from nso_hf.experiment.tasks import TASKS

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]) -> None:
    parser = HfArgumentParser(ExperimentArguments)
    try:
        args, passthrough = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as error:
        parser.error(str(error))
    task = TASKS[args.task]
    if args.run_config is None:
        args.run_config = os.path.join(HERE, "configs", task.config)
    try:
        compare_methods(args, passthrough, main_command(argv), os.path.join(HERE, task.script))
    except ValueError as error:
        sys.exit(f"compare_methods.py: error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
