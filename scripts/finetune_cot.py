"""Chain-of-thought fine-tuning of a causal LM with NSO (or RWP, or a plain Trainer baseline).

With no arguments it runs the embedded offline default: a tiny Llama pretrained on synthetic
arithmetic (cached), LoRA fine-tuned with Trainer and with NSOTrainer, and a table of accuracy
in and out of distribution, Hessian trace and time per step (`make demo`):

    python scripts/finetune_cot.py

A real run (one process, or `--num_processes N` for DDP on N GPUs):

    accelerate launch scripts/finetune_cot.py --recipe gsm8k --train_source openai/gsm8k \
        --eval_sources openai/gsm8k --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
        --method nso --sigma 0.01 --output_dir outputs/gsm8k_nso --num_train_epochs 3 \
        --per_device_train_batch_size 8 --learning_rate 3e-4 --hessian_trace_probes 50

Continue an interrupted run from its newest complete checkpoint (or name one):

    python scripts/finetune_cot.py ...same options... --resume_from_checkpoint true

Keep the checkpoint that scores best on validation (generated exact match), with label noise, and the
accuracy after GGUF Q8_0 / Q4_0 round trips (docs/cot.md, "Training to convergence"):

    python scripts/finetune_cot.py ...same options... --eval_strategy steps --eval_steps 50 \
        --validation_source validation --load_best_model_at_end true --metric_for_best_model exact_match \
        --save_strategy best --save_total_limit 1 --label_noise 0.2 --robustness true

Every option can also come from a YAML file (`--config run.yaml`; command-line options override it).
Options: `python scripts/finetune_cot.py --help`.
"""

from __future__ import annotations

import os
import sys

from nso_hf.cli import parse_with_config
from nso_hf.cot.arguments import make_parser

# The embedded default (`make demo`): a YAML file in the format of --config.
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cot_demo_tiny.yaml")


def parse_arguments(argv: list[str]) -> tuple:
    """The five dataclasses from `argv`; `--config file.yaml` supplies defaults the command line overrides."""
    dataclasses, _ = parse_with_config(make_parser(), argv)
    return dataclasses


def main(argv: list[str]) -> None:
    if not argv:
        from nso_hf.cot.demo import run_cot_demo

        run_cot_demo(DEMO_CONFIG)
        return
    from nso_hf.cot.checks import InputError
    from nso_hf.cot.finetune import run_cot_finetune

    try:
        arguments = parse_arguments(argv)
    except ValueError as error:  # a bad value the dataclasses rejected: usage and one line, exit 2
        make_parser().error(str(error))
    try:
        run_cot_finetune(*arguments)
    except InputError as error:  # bad options or data, found before training: one line, exit 1
        sys.exit(f"finetune_cot.py: error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
