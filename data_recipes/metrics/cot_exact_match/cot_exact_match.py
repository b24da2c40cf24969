"""Exact match of normalised final answers, as an `evaluate` metric that loads offline.

`evaluate.load("exact_match")` fetches its script from the Hub; this module ships in the repo so
`evaluate.load(<this folder>)` works without network. Predictions and references are compared
after stripping surrounding spaces; normalise answers first (`data_recipes.answers`).
evaluate scans this file's imports to check dependencies: keep one import per line.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference after stripping surrounding whitespace."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, the extracted answers.
    references: list of str, the gold answers.
Returns:
    exact_match: float in [0, 1].
    num_correct: int.
    num_examples: int.
"""
_CITATION = ""


class CotExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
        correct = sum(str(p).strip() == str(r).strip() for p, r in zip(predictions, references))
        total = len(references)
        return {"exact_match": correct / total if total else 0.0, "num_correct": correct, "num_examples": total}
