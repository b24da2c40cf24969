"""Compare methods on one chain-of-thought task over seeds, at equal steps and at equal compute.

Each method's strength is chosen on a validation split, then every method runs for every seed; the
results (mean ± std, seed-paired differences with 95% t-intervals, the pre-registered decision) go
to results.json, results.md and results.png in --output_dir. docs/results.md has the measured table.

    python scripts/compare_methods.py                         # the embedded default (`make experiment`)
    python scripts/compare_methods.py --quick --output_dir /tmp/quick     # the pipeline in < 1 minute
    python scripts/compare_methods.py --methods none nso sam --seeds 0 1 2 3 4 --steps 300 \
        --grid nso=0.005,0.01,0.02 --output_dir outputs/cmp
    # any other option goes to every finetune_cot.py run. A real model in bf16 on GPUs, each run
    # launched by accelerate (docs/results.md, "On a GPU"):
    python scripts/compare_methods.py --launcher "accelerate launch --num_processes 8" \
        --run_config my_gsm8k.yaml --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --bf16 true \
        --use_cpu false --validation_sources data/val.jsonl --selection val --test_sources data/test.jsonl --primary test

Options: `python scripts/compare_methods.py --help` (the finetune_cot.py options: its own --help).
"""

from __future__ import annotations

import os
import sys

from transformers import HfArgumentParser

from nso_hf.experiment.compare import ExperimentArguments, compare_methods, main_command

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUN_CONFIG = os.path.join(HERE, "configs", "cot_demo_tiny.yaml")


def main(argv: list[str]) -> None:
    parser = HfArgumentParser(ExperimentArguments)
    try:
        args, passthrough = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as error:
        parser.error(str(error))
    if args.run_config is None:
        args.run_config = DEFAULT_RUN_CONFIG
    try:
        compare_methods(args, passthrough, main_command(argv), os.path.join(HERE, "finetune_cot.py"))
    except ValueError as error:
        sys.exit(f"compare_methods.py: error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
