"""Synthetic multi-step arithmetic word problems: offline, deterministic, with a length knob.

"Ava has 7 coins. Ava finds 5 more coins. Ava gives away 3 coins. How many coins does Ava have
now?" -> rationale "7 + 5 = 12\\n12 - 3 = 9", answer "9" (one rationale line per step; the
training target ends in "#### 9", the GSM8K convention). Splits: "train" and "test" draw the same
number of steps and are disjoint by construction (a question's CRC32 picks its split); "ood"
draws more steps than training, to measure length generalisation. "validation" and
"ood_validation" are held-out twins of "test" and "ood" (same steps, disjoint problems), for choosing
settings without looking at the test splits. Same seed, same data.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from typing import Any

from data_recipes.base import COLUMNS, LoadReport, Recipe

SPLITS = ("train", "validation", "test", "ood_validation", "ood")
OPERATIONS = ("add", "sub", "mul")
NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kai", "Lena")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles")
# A question's CRC32 modulo BUCKETS picks its split: in distribution bucket 0 is "test", 1 "validation",
# the rest "train"; out of distribution even buckets are "ood", odd ones "ood_validation".
BUCKETS = 5
IN_DISTRIBUTION_BUCKET = {"test": 0, "validation": 1}


def make_problem(rng: random.Random, num_steps: int, max_operand: int, operations: Sequence[str]) -> dict[str, str]:
    """One word problem with `num_steps` operations on a running count.

    Args:
        rng: the random source (the only one used, so the output is a function of its state).
        num_steps: operations after the starting amount.
        max_operand: operands are drawn from 1..max_operand (the start from 1..2*max_operand).
        operations: allowed subset of ("add", "sub", "mul"); "sub" is replaced by "add" when it
            would go negative, "mul" (by 2 or 3) by "add" when the count exceeds 10*max_operand.

    Returns:
        {"question", "rationale", "answer"}.
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, 2 * max_operand)
    sentences = [f"{name} has {value} {item}."]
    lines = []
    for _ in range(num_steps):
        op = rng.choice(list(operations))
        operand = rng.randint(1, max_operand)
        if op == "sub" and operand > value:
            op = "add"
        if op == "mul" and value > 10 * max_operand:
            op = "add"
        if op == "add":
            sentences.append(f"{name} gets {operand} more {item}.")
            result, line = value + operand, f"{value} + {operand} = {value + operand}"
        elif op == "sub":
            sentences.append(f"{name} gives away {operand} {item}.")
            result, line = value - operand, f"{value} - {operand} = {value - operand}"
        else:
            factor = 2 + (operand % 2)
            word = "doubles" if factor == 2 else "triples"
            sentences.append(f"{name} {word} the {item}.")
            result, line = value * factor, f"{value} * {factor} = {value * factor}"
        lines.append(line)
        value = result
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "rationale": "\n".join(lines), "answer": str(value)}


def bucket_split(bucket: int, ood: bool) -> str:
    """The split a question of CRC32 bucket `bucket` belongs to, in or out of distribution."""
    if ood:
        return "ood" if bucket % 2 == 0 else "ood_validation"
    for split, owned in IN_DISTRIBUTION_BUCKET.items():
        if bucket == owned:
            return split
    return "train"


class SyntheticRecipe(Recipe):
    """Generator recipe: `load(split)` returns that split ("train", "validation", "test", "ood_validation", "ood").

    Args:
        min_steps, max_steps: steps per training/test problem (inclusive range).
        ood_min_steps, ood_max_steps: steps per out-of-distribution problem; must exceed max_steps.
        max_operand: largest operand (sets the size of the numbers).
        operations: allowed operations, a subset of ("add", "sub", "mul").
        num_train, num_test, num_ood: split sizes ("validation" has num_test problems,
            "ood_validation" num_ood).
        seed: the data seed.
    """

    name = "synthetic"
    answer_kind = "number"

    def __init__(
        self,
        min_steps: int = 2,
        max_steps: int = 3,
        ood_min_steps: int = 4,
        ood_max_steps: int = 5,
        max_operand: int = 9,
        operations: Sequence[str] = ("add", "sub"),
        num_train: int = 1000,
        num_test: int = 200,
        num_ood: int = 200,
        seed: int = 0,
        on_bad_row: str = "raise",
    ) -> None:
        super().__init__(on_bad_row=on_bad_row)
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"Need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}.")
        if not max_steps < ood_min_steps <= ood_max_steps:
            raise ValueError(
                f"The out-of-distribution split needs more steps than training: got max_steps={max_steps}, "
                f"ood_min_steps={ood_min_steps}, ood_max_steps={ood_max_steps}."
            )
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}.")
        unknown = [op for op in operations if op not in OPERATIONS]
        if unknown or not operations:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {list(operations)}.")
        self.min_steps, self.max_steps = min_steps, max_steps
        self.ood_min_steps, self.ood_max_steps = ood_min_steps, ood_max_steps
        self.max_operand = max_operand
        self.operations = tuple(operations)
        self.sizes = {"train": num_train, "validation": num_test, "test": num_test, "ood_validation": num_ood, "ood": num_ood}
        self.seed = seed

    def generate(self, split: str, num_examples: int | None = None) -> list[dict[str, str]]:
        """The examples of `split`, deterministic in (seed, split, knobs)."""
        if split not in SPLITS:
            raise ValueError(f"Unknown synthetic split {split!r}; use one of {SPLITS}.")
        count = self.sizes[split] if num_examples is None else num_examples
        ood = split.startswith("ood")
        low, high = (self.ood_min_steps, self.ood_max_steps) if ood else (self.min_steps, self.max_steps)
        rng = random.Random(f"{self.seed}-{split}")
        seen: set[str] = set()
        examples: list[dict[str, str]] = []
        attempts = 0
        while len(examples) < count:
            attempts += 1
            if attempts > 100 * count + 1000:
                raise ValueError(
                    f"Could not draw {count} distinct {split!r} problems; raise max_operand or the step range."
                )
            problem = make_problem(rng, rng.randint(low, high), self.max_operand, self.operations)
            question = problem["question"]
            if question in seen:
                continue
            if bucket_split(zlib.crc32(question.encode()) % BUCKETS, ood) != split:
                continue
            seen.add(question)
            examples.append(problem)
        return examples

    def parse_row(self, row: dict[str, Any]) -> dict[str, str]:
        return {name: str(row[name]) for name in COLUMNS}

    def load(self, source: str = "train", split: str = "train", max_samples: int | None = None):
        """`source` names the split to generate, one of `SPLITS` (`split` is unused)."""
        import datasets

        examples = self.generate(source, max_samples)
        self.last_report = LoadReport(source=f"synthetic:{source}", kept=len(examples))
        return datasets.Dataset.from_dict({name: [e[name] for e in examples] for name in COLUMNS})

    def write_gsm8k_jsonl(self, path: str, split: str, num_examples: int | None = None) -> int:
        """Write `split` in the GSM8K file layout ({"question", "answer": "rationale\\n#### N"}); returns rows."""
        examples = self.generate(split, num_examples)
        with open(path, "w", encoding="utf-8") as handle:
            for example in examples:
                row = {"question": example["question"], "answer": f"{example['rationale']}\n#### {example['answer']}"}
                handle.write(json.dumps(row) + "\n")
        return len(examples)
