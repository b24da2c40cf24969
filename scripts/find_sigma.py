"""Recommend NSO's sigma for a model and its training data, in seconds (docs/results.md, "Choosing sigma").

The loss increase E[L(W + U)] - L(W) under noise U ~ N(0, sigma^2 I) on the trainable weights is
measured over a grid of sigmas on a few training batches, at the weights training starts from; the
recommendation is the largest sigma whose increase stays within --target (default 5%) of the loss.
Every finetune_cot.py option is accepted (model, data, LoRA, --config), so the model and batches are
those the fine-tuning run would start with.

    python scripts/find_sigma.py                                   # the embedded default task
    python scripts/find_sigma.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
        --recipe gsm8k --train_source openai/gsm8k --per_device_train_batch_size 8
    python scripts/find_sigma.py --sigma_grid 0.005 0.01 0.02 --target 0.1 --output_json sigma.json
"""

from __future__ import annotations

import os
import sys

from nso_hf.cli import parse_with_config
from nso_hf.cot.arguments import make_parser
from nso_hf.cot.find_sigma import SigmaFinderArguments, run_find_sigma

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cot_demo_tiny.yaml")


def main(argv: list[str]) -> None:
    from nso_hf.cot.checks import InputError

    parser = make_parser((SigmaFinderArguments,))
    try:
        script_args, data_args, training_args, _, lora_args, finder = parse_with_config(parser, argv, DEFAULT_CONFIG)[0]
    except ValueError as error:
        parser.error(str(error))
    try:
        run_find_sigma(script_args, data_args, training_args, lora_args, finder)
    except (InputError, ValueError) as error:
        sys.exit(f"find_sigma.py: error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
