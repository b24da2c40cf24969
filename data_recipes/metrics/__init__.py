"""Metric modules shipped with the recipes, loadable offline with `evaluate.load(path)`."""

import os

EXACT_MATCH_METRIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cot_exact_match")
