"""Any JSON Lines / JSON / Parquet file, its columns mapped to question, rationale and answer by name."""

from __future__ import annotations

from typing import Any

from data_recipes.base import Recipe, require_text


class JsonlRecipe(Recipe):
    """A file with arbitrary column names.

    Args:
        question_field: column holding the question.
        rationale_field: column holding the rationale (None: no rationale, answer-only training).
        answer_field: column holding the final answer.
        answer_kind: how answers compare: "number", "yesno", "letter" or "text".
        on_bad_row: "raise" or "drop".
    """

    name = "jsonl"

    def __init__(
        self,
        question_field: str = "question",
        rationale_field: str | None = "rationale",
        answer_field: str = "answer",
        answer_kind: str = "text",
        on_bad_row: str = "raise",
    ) -> None:
        self.answer_kind = answer_kind
        super().__init__(on_bad_row=on_bad_row)
        self.question_field = question_field
        self.rationale_field = rationale_field
        self.answer_field = answer_field

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        question = require_text(row, self.question_field)
        rationale = ""
        if self.rationale_field is not None:
            rationale = require_text(row, self.rationale_field)
        answer = self.checked_answer(row.get(self.answer_field), self.answer_field)
        return {"question": question, "rationale": rationale, "answer": answer}
