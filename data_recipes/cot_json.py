"""The common chain-of-thought JSON layout: one object per example, `{"question", "rationale", "answer"}`.

This is the layout `Recipe.load` itself returns, and what distilled-CoT releases usually ship
(one rationale per question). Every named recipe accepts it besides its dataset's own layout.
"""

from __future__ import annotations

from typing import Any

from data_recipes.base import Recipe, require_text


def is_cot_json_row(row: dict[str, Any], own_answer_field: str | None = None) -> bool:
    """True when a raw row uses the common layout.

    Args:
        row: the raw row.
        own_answer_field: the answer column of the recipe's own layout ("answerKey", "correct"),
            for recipes where it differs from "answer". Then a row with "question" and "answer" but
            without that column is the common layout too, also without a rationale (answer-only
            files such as `{"question": "... Answer choices: (A) ...", "answer": "A"}`).

    Returns:
        Whether to read the row with `parse_cot_json_row`.
    """
    if "question" not in row:
        return False
    if "rationale" in row:
        return True
    return own_answer_field is not None and own_answer_field not in row and "answer" in row


def parse_cot_json_row(recipe: Recipe, row: dict[str, Any]) -> dict[str, str]:
    """Map a common-layout row through `recipe`'s answer normalisation.

    Args:
        recipe: supplies `checked_answer` (the answer kind: number, yes/no, letter or text).
        row: {"question": str, "rationale": str, "answer": str | bool}.

    Returns:
        {"question", "rationale", "answer"} with the answer normalised.
    """
    question = require_text(row, "question")
    rationale = row.get("rationale")
    rationale = "" if rationale is None else str(rationale).strip()
    answer = recipe.checked_answer(row.get("answer"), "answer")
    return {"question": question, "rationale": rationale, "answer": answer}


class CoTJsonRecipe(Recipe):
    """Any file in the common layout, with the answer compared as a given kind.

    Args:
        answer_kind: "number", "yesno", "letter" or "text".
        on_bad_row: "raise" or "drop".
    """

    name = "cot_json"

    def __init__(self, answer_kind: str = "text", on_bad_row: str = "raise") -> None:
        self.answer_kind = answer_kind
        super().__init__(on_bad_row=on_bad_row)

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        return parse_cot_json_row(self, row)
