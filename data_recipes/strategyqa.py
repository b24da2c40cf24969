"""StrategyQA: yes/no questions that need implicit multi-step reasoning.

Hub layout (e.g. `ChilleH/StrategyQA`, `wics/strategy-qa`): {"qid", "term", "description",
"question", "answer": bool, "facts": [str, ...], "decomposition": [str, ...]}. The facts, joined,
are the rationale; the answer becomes "yes" or "no". The common CoT-JSON layout is accepted too.
"""

from __future__ import annotations

from typing import Any

from data_recipes.base import Recipe, require_text
from data_recipes.cot_json import is_cot_json_row, parse_cot_json_row


class StrategyQARecipe(Recipe):
    """StrategyQA from the Hub layout or the common CoT-JSON layout; answers are "yes"/"no"."""

    name = "strategyqa"
    answer_kind = "yesno"

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        if is_cot_json_row(row):
            return parse_cot_json_row(self, row)
        question = require_text(row, "question")
        facts = row.get("facts") or []
        if isinstance(facts, str):
            facts = [facts]
        rationale = " ".join(str(fact).strip() for fact in facts if str(fact).strip())
        return {"question": question, "rationale": rationale, "answer": self.checked_answer(row.get("answer"), "answer")}
