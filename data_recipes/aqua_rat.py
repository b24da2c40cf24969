"""AQuA-RAT (`deepmind/aqua_rat`): algebra word problems with five options and a written rationale.

Hub layout: {"question", "options": ["A)21", "B)21.5", ...], "rationale", "correct": "B"}. The
options are appended to the question, the rationale is kept as written, the answer is the letter.
The common CoT-JSON layout is accepted too.
"""

from __future__ import annotations

from typing import Any

from data_recipes.base import Recipe, RowError, require_text
from data_recipes.choices import format_choices, split_option
from data_recipes.cot_json import is_cot_json_row, parse_cot_json_row


class AquaRatRecipe(Recipe):
    """AQuA-RAT from the Hub layout or the common CoT-JSON layout; answers are letters."""

    name = "aqua_rat"
    answer_kind = "letter"
    hub_config = "raw"

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        if "correct" not in row and is_cot_json_row(row, own_answer_field="correct"):
            return parse_cot_json_row(self, row)
        question = require_text(row, "question")
        options = row.get("options")
        if not options or not isinstance(options, list):
            raise RowError("options", "missing or not a list")
        try:
            labels, texts = zip(*(split_option(str(option)) for option in options))
        except ValueError as error:
            raise RowError("options", str(error)) from error
        rationale = row.get("rationale")
        rationale = "" if rationale is None else str(rationale).strip()
        return {
            "question": f"{question}\n{format_choices(labels, texts)}",
            "rationale": rationale,
            "answer": self.checked_answer(row.get("correct"), "correct"),
        }
