"""GSM8K (`openai/gsm8k`, config "main"): grade-school math word problems with worked solutions.

Raw row: {"question": str, "answer": "step 1 <<48/2=24>>24\\nstep 2\\n#### 72"}. The rationale is
the text before `####`, with the calculator annotations `<<48/2=24>>` removed by default (they
are tool-use markup, not reasoning a model should imitate); the answer is what follows `####`
with commas and spaces removed.
"""

from __future__ import annotations

import re
from typing import Any

from data_recipes.base import AnswerKindError, Recipe, require_text
from data_recipes.cot_json import is_cot_json_row, parse_cot_json_row

CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def strip_calculator_notes(text: str) -> str:
    """Remove GSM8K calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
    return CALCULATOR_NOTE.sub("", text)


class GSM8KRecipe(Recipe):
    """GSM8K, from the Hub or a local file of the same format (or the common CoT-JSON layout).

    Args:
        keep_calculator_notes: keep `<<a*b=c>>` annotations in the rationale (default: strip).
        on_bad_row: "raise" or "drop".
    """

    name = "gsm8k"
    answer_kind = "number"
    hub_config = "main"

    def __init__(self, keep_calculator_notes: bool = False, on_bad_row: str = "raise") -> None:
        super().__init__(on_bad_row=on_bad_row)
        self.keep_calculator_notes = keep_calculator_notes

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        if is_cot_json_row(row):
            return parse_cot_json_row(self, row)
        question = require_text(row, "question")
        solution = require_text(row, "answer")
        if "####" not in solution:
            # An AnswerKindError, so that a file of other answers ("Yes", "B") is told which recipe fits.
            raise AnswerKindError("answer", "no final answer after '####'", solution)
        rationale, final = solution.rsplit("####", 1)
        if not self.keep_calculator_notes:
            rationale = strip_calculator_notes(rationale)
        return {
            "question": question,
            "rationale": rationale.strip(),
            "answer": self.checked_answer(final, "answer"),
        }
