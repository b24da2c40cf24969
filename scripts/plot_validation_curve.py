"""The validation-accuracy curve of runs that evaluated during training (`--eval_strategy steps`), as a PNG.

    python scripts/plot_validation_curve.py outputs/cot_converged/cot_results.json docs/cot_validation_curve.png
    python scripts/plot_validation_curve.py a/cot_results.json b/cot_results.json both.png --labels "n=300" "n=100"

Reads `cot_results.json` (finetune_cot.py), `eval_results.json` or `clip_results.json` (pretrain_clip.py),
one file or several: one line per run, the step the final weights came from starred
(`--load_best_model_at_end`). With several files each line is named by its file's label (`--labels`,
default the file's folder) and its method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nso_hf.best_checkpoint import plot_selection_curves, selection_sections


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results JSONs written by finetune_cot.py or pretrain_clip.py")
    parser.add_argument("png", help="where the plot goes")
    parser.add_argument("--labels", nargs="+", help="one label per results file (default: each file's folder name)")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in args.results]
    if len(labels) != len(args.results):
        parser.error(f"--labels: give one label per results file ({len(args.results)}), got {len(labels)}.")
    sections = {}
    for path, label in zip(args.results, labels, strict=True):
        with open(path, encoding="utf-8") as handle:
            found = selection_sections(json.load(handle))
        if not found:
            parser.error(f"{path}: no run in it evaluated during training (--eval_strategy steps|epoch): no curve to plot.")
        sections.update(found if len(args.results) == 1 else {f"{label}: {m}": v for m, v in found.items()})
    plot_selection_curves(sections, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main(sys.argv[1:])
