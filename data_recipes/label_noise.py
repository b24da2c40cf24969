"""Label noise: a seeded fraction of the training rows gets a wrong label; evaluation data are never touched.

Flat-minima methods gained most under label noise with early stopping (Baek et al., ICLR 2024), so both
training scripts take `--label_noise p`. Which rows change is `noisy_rows(n, p, seed)`: round(p * n) rows
drawn without replacement by a generator seeded with the data seed alone, so every method and training
seed of a comparison trains on the same corrupted rows.

Chain-of-thought rows (`add_label_noise`) get a wrong final answer of the recipe's kind (a number moved by
1-3, yes <-> no, another choice letter, another row's answer for free text), and the last mention of the
gold answer in the rationale is rewritten to match, so the target stays a consistent (wrong) derivation:
"7 + 5 = 12\\n12 - 3 = 9 #### 9" -> "7 + 5 = 12\\n12 - 3 = 11 #### 11". A rationale that never states the
answer (StrategyQA's facts) keeps its text; the report counts those. CLIP's version (another class's
caption) is `nso_hf.clip.label_noise`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

from data_recipes.answers import answer_mentions, normalize_number

NUMBER_SHIFTS = (-3, -2, -1, 1, 2, 3)
DEFAULT_LETTERS = "ABCDE"
_CHOICE = re.compile(r"\(([A-Z])\)")


def check_label_noise(p: float) -> None:
    """Raises ValueError unless 0 <= p < 1 (p = 1 would leave no correct label to learn from)."""
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p < 1.0):
        raise ValueError(
            f"--label_noise must be a fraction of the training rows in [0, 1), got {p!r}: e.g. --label_noise 0.2 "
            "gives a fifth of them a wrong label; 0 trains on the data as they are."
        )


def noisy_rows(num_rows: int, p: float, seed: int) -> list[int]:
    """The rows that get a wrong label: round(p * num_rows) of them, sorted; a pure function of its arguments.

    Args:
        num_rows: training rows.
        p: the fraction in [0, 1).
        seed: the label-noise seed (not the training seed: every run of a comparison shares the rows).

    Returns:
        Row indices in increasing order; [] when p = 0.
    """
    check_label_noise(p)
    count = round(p * num_rows)
    return sorted(random.Random(f"label-noise-{seed}").sample(range(num_rows), count)) if count else []


@dataclass
class LabelNoiseReport:
    """What `--label_noise` did: the fraction, the seed, the rows changed (and, for CoT, rationales rewritten)."""

    p: float
    seed: int
    rows: int
    rows_changed: int
    rationales_changed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wrong_answer(answer: str, kind: str, rng: random.Random, question: str = "", others: list[str] | None = None) -> str:
    """A normalised answer of `kind` different from `answer`.

    Args:
        answer: the gold answer (normalised).
        kind: "number" (moved by 1-3 either way, kept >= 0 when it was), "yesno" (flipped), "letter" (another
            of the question's "(X)" choices, A-E when it lists none) or "text" (one of `others`).
        rng: the draw.
        question: where choice letters are read from.
        others: the other rows' answers (text kind).

    Raises:
        ValueError: no other answer exists (a text dataset with a single distinct answer).
    """
    if kind == "number":
        value = Decimal(answer)
        shifts = [s for s in NUMBER_SHIFTS if value < 0 or value + s >= 0]
        return normalize_number(str(value + rng.choice(shifts)))
    if kind == "yesno":
        return "no" if answer == "yes" else "yes"
    if kind == "letter":
        letters = sorted(set(_CHOICE.findall(question))) if "Answer choices" in question else []
        letters = letters if len(letters) >= 2 else list(DEFAULT_LETTERS)
        return rng.choice([c for c in letters if c != answer])
    candidates = sorted({o for o in others or [] if o != answer})
    if not candidates:
        raise ValueError("--label_noise on text answers needs at least two distinct answers in the training data.")
    return rng.choice(candidates)


def rewrite_last_mention(rationale: str, old: str, new: str, kind: str) -> tuple[str, bool]:
    """The rationale with its last mention of the answer `old` replaced by `new`, and whether one was found."""
    spans = [(start, end) for start, end, value in answer_mentions(rationale, kind) if value == old]
    if not spans:
        return rationale, False
    start, end = spans[-1]
    return rationale[:start] + new + rationale[end:], True


def add_label_noise(dataset: Any, p: float, seed: int, kind: str) -> tuple[Any, LabelNoiseReport]:
    """A recipe's training dataset with `noisy_rows` given wrong answers and matching rationales.

    Args:
        dataset: a `datasets.Dataset` with "question", "rationale", "answer" (as `Recipe.load` returns).
        p: fraction of rows to change, in [0, 1).
        seed: the label-noise seed.
        kind: the recipe's answer kind.

    Returns:
        (the dataset, unchanged when p = 0; the report).
    """
    import datasets

    rows = noisy_rows(len(dataset), p, seed)
    report = LabelNoiseReport(p=p, seed=seed, rows=len(dataset), rows_changed=len(rows), rationales_changed=0)
    if not rows:
        return dataset, report
    columns = {name: list(dataset[name]) for name in dataset.column_names}
    rng = random.Random(f"label-noise-answers-{seed}")
    others = sorted(set(columns["answer"])) if kind == "text" else None
    for i in rows:
        old = columns["answer"][i]
        new = wrong_answer(old, kind, rng, columns["question"][i], others)
        columns["answer"][i] = new
        columns["rationale"][i], changed = rewrite_last_mention(columns["rationale"][i], old, new, kind)
        report.rationales_changed += changed
    return datasets.Dataset.from_dict(columns), report
