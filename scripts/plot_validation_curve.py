"""The validation-accuracy curve of runs that evaluated during training (`--eval_strategy steps`), as a PNG.

    python scripts/plot_validation_curve.py outputs/cot_converged/cot_results.json docs/cot_validation_curve.png

Reads `cot_results.json` (finetune_cot.py), `eval_results.json` or `clip_results.json` (pretrain_clip.py):
one line per run, the step the final weights came from starred (`--load_best_model_at_end`).
"""

from __future__ import annotations

import argparse
import json
import sys

from nso_hf.best_checkpoint import plot_selection_curves, selection_sections


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results JSON written by finetune_cot.py or pretrain_clip.py")
    parser.add_argument("png", help="where the plot goes")
    args = parser.parse_args(argv)
    with open(args.results, encoding="utf-8") as handle:
        results = json.load(handle)
    try:
        plot_selection_curves(selection_sections(results), args.png)
    except ValueError as error:
        parser.error(f"{args.results}: {error}")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main(sys.argv[1:])
