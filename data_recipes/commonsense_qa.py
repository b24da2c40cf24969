"""CommonsenseQA (`tau/commonsense_qa`): five-way multiple choice about everyday concepts.

Hub layout: {"id", "question", "question_concept", "choices": {"label": ["A", ...], "text": [...]},
"answerKey": "A"}. The choices are appended to the question ("Answer choices: (A) ... (E) ..."),
the answer is the letter. The Hub layout has no rationale (empty: answer-only training); the
common CoT-JSON layout (with "choices" optional) usually carries one, and is also read without it:
`{"question": "... Answer choices: (A) ... (E) ...", "answer": "A"}`.
"""

from __future__ import annotations

from typing import Any

from data_recipes.base import Recipe, RowError, require_text
from data_recipes.choices import format_choices
from data_recipes.cot_json import is_cot_json_row, parse_cot_json_row


class CommonsenseQARecipe(Recipe):
    """CommonsenseQA from the Hub layout or the common CoT-JSON layout; answers are letters."""

    name = "commonsense_qa"
    answer_kind = "letter"

    def _with_choices(self, question: str, row: dict[str, Any]) -> str:
        choices = row.get("choices")
        if choices is None:
            return question
        if not isinstance(choices, dict) or "label" not in choices or "text" not in choices:
            raise RowError("choices", "expected {'label': [...], 'text': [...]}")
        if len(choices["label"]) != len(choices["text"]) or not choices["label"]:
            raise RowError("choices", "labels and texts differ in length or are empty")
        return f"{question}\n{format_choices(choices['label'], choices['text'])}"

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        if is_cot_json_row(row, own_answer_field="answerKey"):
            example = parse_cot_json_row(self, row)
            example["question"] = self._with_choices(example["question"], row)
            return example
        question = self._with_choices(require_text(row, "question"), row)
        return {"question": question, "rationale": "", "answer": self.checked_answer(row.get("answerKey"), "answerKey")}
