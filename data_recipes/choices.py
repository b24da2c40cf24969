"""Putting lettered answer choices into the question text, as multiple-choice CoT prompts do."""

from __future__ import annotations

import re
from collections.abc import Sequence

_OPTION = re.compile(r"^\s*\(?([A-Za-z])\)\s*(.*)$", re.DOTALL)


def format_choices(labels: Sequence[str], texts: Sequence[str]) -> str:
    """"Answer choices: (A) ignore (B) enforce ..." from parallel label and text lists."""
    return "Answer choices: " + " ".join(f"({label.strip().upper()}) {text.strip()}" for label, text in zip(labels, texts))


def split_option(option: str) -> tuple[str, str]:
    """"A)21" or "(a) 21" -> ("A", "21"); a string without a letter prefix raises ValueError."""
    match = _OPTION.match(option)
    if not match:
        raise ValueError(f"option {option!r} does not start with a letter like 'A)'")
    return match.group(1).upper(), match.group(2).strip()
