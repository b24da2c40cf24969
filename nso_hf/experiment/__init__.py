"""Comparisons of methods that a user can rerun: `scripts/compare_methods.py` (docs/results.md).

One concept per file: `statistics` (mean ± std, paired t-intervals), `plan` (which runs, equal steps
and equal compute), `runner` (each run a finetune_cot.py run in its own process), `report` (tables,
paired differences, the decision, the plot), `compare` (the pipeline and its arguments).
"""
