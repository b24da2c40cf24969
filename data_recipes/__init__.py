"""Chain-of-thought dataset recipes: every source becomes columns "question", "rationale", "answer".

    from data_recipes import get_recipe
    recipe = get_recipe("gsm8k")
    ds = recipe.load("openai/gsm8k")          # a Hub id, or a local .jsonl/.json/.parquet path
    recipe.extract_answer("... so 1,234 dollars.\\n#### 1,234")  # -> "1234"
"""

from __future__ import annotations

from data_recipes.answers import extract_answer, normalize_answer
from data_recipes.aqua_rat import AquaRatRecipe
from data_recipes.base import LoadReport, Recipe
from data_recipes.commonsense_qa import CommonsenseQARecipe
from data_recipes.cot_json import CoTJsonRecipe
from data_recipes.formatting import FormatReport, build_prompt, build_target, format_for_training
from data_recipes.gsm8k import GSM8KRecipe
from data_recipes.jsonl import JsonlRecipe
from data_recipes.strategyqa import StrategyQARecipe
from data_recipes.synthetic import SyntheticRecipe

RECIPES: dict[str, type[Recipe]] = {
    recipe.name: recipe
    for recipe in (
        GSM8KRecipe,
        StrategyQARecipe,
        CommonsenseQARecipe,
        AquaRatRecipe,
        CoTJsonRecipe,
        JsonlRecipe,
        SyntheticRecipe,
    )
}


def get_recipe(name: str, **kwargs) -> Recipe:
    """Instantiate the recipe registered as `name` with its keyword arguments.

    Args:
        name: one of `RECIPES` ("gsm8k", "strategyqa", "commonsense_qa", "aqua_rat", "cot_json",
            "jsonl", "synthetic").
        **kwargs: the recipe's own options, e.g. `question_field="q"` for "jsonl".

    Returns:
        The recipe object.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; available: {sorted(RECIPES)}.")
    return RECIPES[name](**kwargs)


__all__ = [
    "RECIPES",
    "FormatReport",
    "LoadReport",
    "Recipe",
    "build_prompt",
    "build_target",
    "extract_answer",
    "format_for_training",
    "get_recipe",
    "normalize_answer",
]
